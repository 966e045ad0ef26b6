"""Process settings from ``STILLHOUSE_*`` environment variables (and a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.session import DEFAULT_DATABASE_URL

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Built once at an edge (CLI command, worker start) and passed down as values."""

    model_config = SettingsConfigDict(env_prefix="STILLHOUSE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL, description="SQLAlchemy URL; postgresql+psycopg://… for production"
    )
    broker_url: str | None = Field(None, description="redis://… turns on distributed mode")
    teacher_base_url: str | None = Field(
        None, description="overrides every spec's teacher.base_url (e.g. a local proxy)"
    )
    http_transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp", description="httpx transport for teacher calls"
    )
    worker_concurrency: int = Field(2, ge=1, description="Celery worker processes")
    task_time_limit_s: int = Field(900, ge=60, description="hard limit for one batch task")
    runs_dir: Path = Field(Path("runs"), description="where student runs are written")

    @property
    def distributed(self) -> bool:
        return bool(self.broker_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
