"""The HTTP client under the teacher calls: one ``httpx.AsyncClient`` per process and teacher.

The default transport is aiohttp's (``httpx-aiohttp``): plain httpx spends 11-20 ms of CPU
per request on its connection pool bookkeeping past ~32 connections (encode/httpx#3215).
Teacher answers are small JSON bodies, so the transport reads each one whole and hands httpx
a finished response instead of a stream (about a tenth of a millisecond less per call), and
neither layer keeps cookies: teacher APIs are stateless.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from pydantic import SecretStr

from schemas.errors import ConfigError
from workers.providers import provider_for
from workers.spec import TeacherConfig

__all__ = ["make_http_client", "teacher_key"]


def teacher_key(config: TeacherConfig) -> SecretStr | None:
    """The teacher's API key, read once from the variable ``teacher.api_key_env`` names (None
    when the spec names none); ``ConfigError`` when that variable is unset or empty. The key
    travels as a ``SecretStr`` from here: into the client's headers and the redactor only."""
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ConfigError(
            f"the spec's teacher.api_key_env names {config.api_key_env}, "
            f"but that environment variable is not set: export it first"
        )
    return SecretStr(key)


def make_http_client(
    config: TeacherConfig, *, api_key: SecretStr | None = None, transport: str = "aiohttp"
) -> httpx.AsyncClient:
    """One client per process and teacher, sized to the spec's concurrency, sending
    ``api_key`` (from :func:`teacher_key`) the provider's way."""
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=config.concurrency
    )
    timeout = httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s))
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers.update(provider_for(config.provider).auth_headers(api_key.get_secret_value()))
    base_url = config.base_url.rstrip("/")
    if transport == "aiohttp":
        return _StatelessClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=_buffered_transport(limits, config),
        )
    return _StatelessClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits, trust_env=False
    )


def _aiohttp_session(config: TeacherConfig) -> Any:
    """The aiohttp session under httpx: sized to the spec, and keeping no cookies either."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=config.concurrency, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
    )


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: teacher APIs are stateless, and parsing every
    response for cookies cost about a tenth of a millisecond of CPU per call."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class _StatelessClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` without cookie handling (the only change)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = _NoCookies()


def _buffered_transport(limits: httpx.Limits, config: TeacherConfig) -> httpx.AsyncBaseTransport:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport
    from httpx_aiohttp.transport import map_aiohttp_exceptions

    class BufferedAiohttpTransport(AiohttpTransport):
        """httpx-aiohttp that reads the (small) body at once: a finished response."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if not isinstance(self.client, aiohttp.ClientSession):
                self.client = self.get_client()
            with map_aiohttp_exceptions():
                async with self.client.request(
                    request.method,
                    str(request.url),
                    headers=[(k.decode(), v.decode()) for k, v in request.headers.raw],
                    data=request.content or None,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=timeout,
                ) as response:
                    body = await response.read()
            return httpx.Response(
                response.status,
                headers=response.raw_headers,
                content=body,
                request=request,
                extensions={"http_version": b"HTTP/1.1"},
            )

    connect = min(10.0, config.timeout_s)
    timeout = aiohttp.ClientTimeout(sock_connect=connect, sock_read=config.timeout_s)
    return BufferedAiohttpTransport(
        limits=limits, trust_env=False, client=lambda: _aiohttp_session(config)
    )
