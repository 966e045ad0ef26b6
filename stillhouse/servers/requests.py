"""What every stillhouse API does with a request before its own work: the bearer token, a
JSON body read to a size limit, and one error shape, ``{"error": {"code", "message"}}``.

Shared by the ingest API and the router, so both refuse the same things the same way.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from schemas.errors import ConfigError

__all__ = ["BearerTokens", "Rejected", "client_gone", "read_json"]


class Rejected(Exception):
    """A request refused before its work starts; becomes one error response."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message}}
        return JSONResponse(body, status_code=self.status, headers=self.headers or None)


class BearerTokens:
    """The tokens a server accepts (``None``: no token is asked, loopback development)."""

    def __init__(self, tokens: Sequence[bytes] | None) -> None:
        self.tokens = tokens

    @classmethod
    def from_settings(
        cls, tokens: Sequence[SecretStr], *, insecure_no_auth: bool, what: str = "API"
    ) -> BearerTokens:
        """The accepted tokens; none is refused unless ``insecure_no_auth`` says otherwise."""
        accepted = [t.get_secret_value().encode() for t in tokens if t.get_secret_value()]
        if not accepted and not insecure_no_auth:
            raise ConfigError(
                f"no {what} tokens: set STILLHOUSE_API_TOKENS=token1,token2 (or, for "
                f"development on 127.0.0.1 only, pass --insecure-no-auth)"
            )
        return cls(None if insecure_no_auth and not accepted else accepted)

    def check(self, request: Request) -> None:
        """Raise :class:`Rejected` (401) unless the request carries an accepted token."""
        if self.tokens is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Rejected(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: Bearer <token>'",
                **{"WWW-Authenticate": 'Bearer realm="stillhouse"'},
            )
        candidate = given.strip().encode()
        matched = False
        for token in self.tokens:  # every token, no early exit: timing says nothing
            matched |= hmac.compare_digest(candidate, token)
        if not matched:
            raise Rejected(
                401,
                "unauthorized",
                "the bearer token is not valid for this server",
                **{"WWW-Authenticate": 'Bearer realm="stillhouse", error="invalid_token"'},
            )


async def read_json(request: Request, limit: int, *, too_large_hint: str, depth_hint: str) -> Any:
    """The request's JSON body, at most ``limit`` bytes (a declared or a streamed body over
    it is a 413 before it is read whole); 415 for another media type, 422 for bad JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Rejected(
            415,
            "unsupported_media_type",
            f"send the body as JSON with 'Content-Type: application/json' "
            f"(got {media_type or 'no content type'!r})",
        )
    too_large = Rejected(
        413, "body_too_large", f"the body is over the limit of {limit} bytes: {too_large_hint}"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():  # also holds a chunked body to the limit
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise Rejected(
            422,
            "invalid_json",
            f"the body is nested too deep to read (objects and arrays about 1,000 levels "
            f"down; {depth_hint}): flatten it",
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(422, "invalid_json", f"the body is not valid JSON: {exc}") from exc


def client_gone() -> Response:
    """The client closed the connection before its body arrived: nobody reads an answer, and
    it is not a server error (nginx's 499, in the metrics)."""
    return Response(status_code=499)
