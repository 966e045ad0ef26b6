"""The stillhouse error tree, split by what the caller does next.

    StillhouseError
    ├── TransientError        retry later; carries ``retry_at`` (or ``retry_after_s``)
    │   ├── RateLimited       the teacher answered 429; honours Retry-After
    │   │   └── TeacherBusy   our governor for the teacher asks for a wait (rates, breaker)
    │   ├── Unavailable       5xx, connection refused or reset
    │   └── TeacherTimeout    no complete answer within the client timeout
    ├── PermanentError        record it on the item and move on; retrying will not help
    │   ├── RequestRejected   the teacher answered 4xx to this request
    │   └── BadResponse       the teacher answered 2xx with a body we cannot use
    └── ConfigError           tell the user exactly what to fix, then stop
        ├── SpecError         a spec file is invalid (file, field path, what is wrong)
        └── BudgetExhausted   the spec's budget_usd is spent; remaining items stay pending

A ``RateLimited`` (either kind) is a *wait*, not a failure: the item goes back with a
``retry_at`` and keeps its attempt, so waits never fail an item.

A refusal or a truncated answer is an *answer*, not an error: like a failed check (bad JSON,
schema violation, disagreement with a known-good record) it becomes a rejected label row with
reason codes (``refused``, ``truncated``). Likewise, nothing rejected is silently dropped.
"""

from __future__ import annotations

__all__ = [
    "BadResponse",
    "BudgetExhausted",
    "ConfigError",
    "DatabaseUnreachable",
    "LeaseExpired",
    "PermanentError",
    "RateLimited",
    "RequestRejected",
    "SpecError",
    "StillhouseError",
    "TeacherBusy",
    "TeacherTimeout",
    "TransientError",
    "Unavailable",
]


class StillhouseError(Exception):
    """Base class of every error stillhouse raises on purpose."""

    kind = "error"


class TransientError(StillhouseError):
    """Worth retrying later; ``retry_after_s`` is the server's hint, if it gave one."""

    kind = "transient"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(TransientError):
    kind = "rate_limited"


class TeacherBusy(RateLimited):
    """The governor asks for a wait before anything is sent (a rate, a block, an open
    circuit breaker): nothing reached the teacher."""

    kind = "teacher_busy"


class Unavailable(TransientError):
    kind = "unavailable"


class TeacherTimeout(TransientError):
    kind = "timeout"


class LeaseExpired(StillhouseError):
    """This worker's lease on the item ran out before its call went out (the process was
    stopped, or the batch waited too long): another worker may hold the item now, so the
    call is not sent. Nothing was spent; the item keeps its attempt."""

    kind = "lease_expired"


class PermanentError(StillhouseError):
    """Retrying will not help: record it on the item and move on."""

    kind = "permanent"


class RequestRejected(PermanentError):
    kind = "rejected_by_server"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class BadResponse(PermanentError):
    kind = "bad_response"


class ConfigError(StillhouseError):
    """The user must change something (a setting, a file, a key) before this can work."""

    kind = "config"


class DatabaseUnreachable(ConfigError):
    """The store cannot be reached (a wrong URL, or the server is down): a long-running
    process may wait for it; a command says so and stops."""

    kind = "database_unreachable"


class SpecError(ConfigError):
    """A spec file is invalid; the message names the file, the field path and the problem."""

    kind = "spec"


class BudgetExhausted(ConfigError):
    """The spec's budget is spent (or fully reserved by calls in flight)."""

    kind = "budget"
