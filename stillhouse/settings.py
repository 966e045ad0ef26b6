"""Process settings from ``STILLHOUSE_*`` environment variables (and a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    worker_concurrency: int = Field(
        2, ge=1, description="batches one `stillhouse worker` labels at once (its pool size)"
    )
    task_time_limit_s: int = Field(900, ge=60, description="hard limit for one batch task")
    celery_config: str | None = Field(
        None, description="a Python module with a site's own Celery settings, applied last"
    )
    dispatch_interval_s: float = Field(0.5, gt=0, description="dispatcher and sweeper period")
    dispatch_max_queued: int = Field(
        5000, ge=1, description="most ids per spec waiting in the broker at once"
    )
    requeue_after_s: float = Field(
        300.0, gt=0, description="a queued item unclaimed this long has lost its message"
    )
    runs_dir: Path = Field(Path("runs"), description="where student runs are written")
    # HTTP ingest (`stillhouse serve`).
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer tokens for POST /v1/items, comma-separated"
    )
    api_max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body")
    api_max_batch: int = Field(500, ge=1, description="most items in one POST /v1/items")
    api_max_backlog: int = Field(
        100_000, ge=1, description="a spec's pending+queued+leased items above which POST gets 429"
    )
    api_retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 429 and 503")
    api_read_timeout_s: float = Field(
        15.0, gt=0, description="a request must arrive whole (headers and body) within this"
    )
    api_max_connections: int = Field(
        1000, ge=1, description="connections open at once per server process (more get 503)"
    )

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        # One variable, comma-separated, so a token can be rotated by adding the new one first.
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @property
    def distributed(self) -> bool:
        return bool(self.broker_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
