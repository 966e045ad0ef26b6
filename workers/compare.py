"""Field-by-field comparison of a teacher's answer with a known-good record, plus grounding.

Each known-good field carries a rule such as ``{"compare": "number", "tolerance": 0.01}``;
:func:`compare` applies it and says whether the field matches and, if not, why in a few words.
Rankings compare by order only; :func:`ungrounded` finds extracted strings the document lacks.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from rapidfuzz import fuzz

# One implementation of the ranking metrics, shared with the student's evaluation (which may
# not import workers); the names stay importable from here.
from storage.stats import _unique
from storage.stats import kendall_tau_graded as kendall_tau_graded
from storage.stats import ndcg_at_k as ndcg_at_k

__all__ = [
    "COMPARE_KINDS",
    "FieldResult",
    "compare",
    "compare_ranking",
    "kendall_tau",
    "kendall_tau_graded",
    "ndcg_at_k",
    "normalize_for_grounding",
    "parse_amount",
    "parse_date",
    "top1_agreement",
    "ungrounded",
]


@dataclass(frozen=True, slots=True)
class FieldResult:
    """The outcome of comparing one field with its known-good value."""

    match: bool
    score: float | None = None
    detail: str | None = None
    precision: float | None = None
    recall: float | None = None


def _verdict(match: bool, detail: str) -> FieldResult:
    return FieldResult(match=match, score=1.0 if match else 0.0, detail=None if match else detail)


def _fold(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().casefold()
    if isinstance(value, list | tuple):
        return [_fold(item) for item in value]
    return value


def _compare_exact(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    return _verdict(value == reference, "not equal")


def _compare_casefold(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    return _verdict(_fold(value) == _fold(reference), "not equal ignoring case")


_ISO_PREFIX = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ].*)?$")
_NUMERIC_YMD = re.compile(r"^(\d{4})[/.](\d{1,2})[/.](\d{1,2})$")
_NUMERIC_DMY = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})$")
_ORDINAL = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)\b", re.IGNORECASE)
_SEPT = re.compile(r"\bsept\b", re.IGNORECASE)
_WORD_FORMATS = ("%d %B %Y", "%d %b %Y", "%B %d %Y", "%b %d %Y")


def _safe_date(year: int, month: int, day: int) -> dt.date | None:
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def _numeric_date(text: str, dayfirst: bool) -> dt.date | None:
    if m := _ISO_PREFIX.match(text) or _NUMERIC_YMD.match(text):
        return _safe_date(int(m[1]), int(m[2]), int(m[3]))
    if not (m := _NUMERIC_DMY.match(text)):
        return None
    first, second, year = int(m[1]), int(m[2]), int(m[3])
    # An unambiguous side (> 12) settles the order; otherwise the rule's convention does.
    if first > 12 or (dayfirst and second <= 12):
        return _safe_date(year, second, first)
    return _safe_date(year, first, second)


def _word_date(text: str) -> dt.date | None:
    cleaned = " ".join(_SEPT.sub("Sep", _ORDINAL.sub(r"\1", text.replace(",", " "))).split())
    for fmt in _WORD_FORMATS:
        try:
            return dt.datetime.strptime(cleaned, fmt).date()
        except ValueError:
            continue
    return None


def parse_date(text: Any, dayfirst: bool = True) -> dt.date | None:
    """A calendar date from common written forms, or None when it cannot be read.

    Reads ISO dates (with or without a time), ``2005/01/21``, ``21/01/2005`` (day first unless
    ``dayfirst`` is False or the day is unambiguous), ``21 January 2005``, ``January 21, 2005``,
    ``21 Jan 2005`` and ``Jan 21st 2005``.
    """
    if isinstance(text, dt.date):
        return text.date() if isinstance(text, dt.datetime) else text
    if not isinstance(text, str) or not text.strip():
        return None
    stripped = text.strip()
    return _numeric_date(stripped, dayfirst) or _word_date(stripped)


def _compare_date(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    dayfirst = bool(rule.get("dayfirst", True))
    got, want = parse_date(value, dayfirst), parse_date(reference, dayfirst)
    if got is None or want is None:
        return FieldResult(match=False, score=0.0, detail="unparseable date")
    return _verdict(got == want, f"{got.isoformat()} != {want.isoformat()}")


_SYMBOLS = {"us$": "USD", "$": "USD", "£": "GBP", "€": "EUR", "¥": "JPY"}
_CODES = ("USD", "GBP", "EUR", "JPY", "CHF", "CAD", "AUD")
_MULTIPLIERS = {
    "k": 3, "thousand": 3,
    "m": 6, "mn": 6, "mln": 6, "million": 6,
    "b": 9, "bn": 9, "billion": 9,
    "t": 12, "tn": 12, "trillion": 12,
}  # fmt: skip
_CURRENCY = "|".join([*(re.escape(s) for s in _SYMBOLS), *_CODES])
_AMOUNT = re.compile(
    rf"^(?P<pre>{_CURRENCY})?\s*(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)\s*"
    rf"(?P<mult>{'|'.join(sorted(_MULTIPLIERS, key=len, reverse=True))})?\.?\s*"
    rf"(?P<pct>%)?\s*(?P<post>{_CURRENCY})?$",
    re.IGNORECASE,
)


def _currency(token: str | None) -> str | None:
    return None if token is None else _SYMBOLS.get(token.lower(), token.upper())


def _split_sign(text: str) -> tuple[str, int]:
    if text.startswith("(") and text.endswith(")"):
        return text[1:-1].strip(), -1
    if text[:1] in "-\u2212":
        return text[1:].strip(), -1
    return text.lstrip("+").strip(), 1


def _amount_from_text(text: str) -> tuple[float, str | None] | None:
    body, sign = _split_sign(" ".join(text.split()))
    match = _AMOUNT.match(body)
    if match is None or (match["pre"] and match["post"]):
        return None
    number = Decimal(match["num"].replace(",", ""))  # the pattern admits only valid digits
    exponent = _MULTIPLIERS[match["mult"].lower()] if match["mult"] else 0
    currency = _currency(match["pre"] or match["post"])
    return sign * float(number.scaleb(exponent)), currency


def parse_amount(text: Any) -> tuple[float, str | None] | None:
    """A number and its currency code (``"USD"``, ``"GBP"``, ``"EUR"`` or None) from an amount.

    Reads ``$1,130,000``, ``1.13bn``, ``£2.5m``, ``€300k``, ``1.2 billion``, ``3 million``,
    ``1,234.5`` and ``(1,200)`` (negative). ``12%`` reads as 12.0. Ints and floats pass through;
    anything else that cannot be read gives None.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return (float(text), None) if math.isfinite(text) else None
    if not isinstance(text, str) or not text.strip():
        return None
    return _amount_from_text(text.strip())


def _within(got: float, want: float, rule: Mapping[str, Any]) -> bool:
    rel = float(rule.get("tolerance", 0) or 0)
    absolute = float(rule.get("abs_tolerance", 0) or 0)
    # A hair of slack so that 1.13bn written two ways still compares equal in floating point.
    allowed = max(absolute, rel * abs(want), 1e-9 * max(abs(want), 1.0))
    return abs(got - want) <= allowed


def _compare_number(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    got, want = parse_amount(value), parse_amount(reference)
    if got is None or want is None:
        return FieldResult(match=False, score=0.0, detail="unparseable number")
    if got[1] and want[1] and got[1] != want[1]:
        return FieldResult(match=False, score=0.0, detail=f"currency {got[1]} != {want[1]}")
    return _verdict(_within(got[0], want[0], rule), f"{got[0]:g} != {want[0]:g}")


def _as_set(value: Any) -> set[str]:
    items = [value] if isinstance(value, str | int | float) else list(value or [])
    return {str(item).strip().casefold() for item in items if item is not None}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 1.0


def _unit_interval(rule: Mapping[str, Any], key: str, default: float | None) -> float | None:
    raw = rule.get(key, default)
    if raw is None:
        return None
    number = float(raw)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{key} must be between 0 and 1, got {raw!r}")
    return number


def _set_detail(got: set[str], want: set[str]) -> str:
    parts = []
    if missing := sorted(want - got):
        parts.append("missing " + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    if extra := sorted(got - want):
        parts.append("extra " + ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else ""))
    return "; ".join(parts)


def _compare_set(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    got, want = _as_set(value), _as_set(reference)
    common = len(got & want)
    jaccard = _ratio(common, len(got | want))
    min_overlap = _unit_interval(rule, "min_overlap", None)
    match = got == want if min_overlap is None else jaccard >= min_overlap
    return FieldResult(
        match=match,
        score=jaccard,
        detail=None if match else _set_detail(got, want),
        precision=_ratio(common, len(got)),
        recall=_ratio(common, len(want)),
    )


def _compare_fuzzy(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    configured = _unit_interval(rule, "threshold", 0.9)
    threshold = 0.9 if configured is None else configured
    got, want = str(value).strip().casefold(), str(reference).strip().casefold()
    score = fuzz.token_sort_ratio(got, want) / 100
    match = score >= threshold
    detail = None if match else f"similarity {score:.2f} < {threshold:.2f}"
    return FieldResult(match=match, score=score, detail=detail)


_Comparer = Callable[[Any, Any, Mapping[str, Any]], FieldResult]
_COMPARERS: dict[str, _Comparer] = {
    "exact": _compare_exact,
    "casefold": _compare_casefold,
    "date": _compare_date,
    "number": _compare_number,
    "set": _compare_set,
    "fuzzy": _compare_fuzzy,
}
COMPARE_KINDS: tuple[str, ...] = tuple(sorted(_COMPARERS))


def compare(value: Any, reference: Any, rule: Mapping[str, Any]) -> FieldResult:
    """Compare a teacher's field with its known-good value under ``rule["compare"]``.

    Raises ValueError for an unknown kind or an out-of-range rule parameter: those are mistakes
    in the spec, not in the teacher's answer.
    """
    kind = rule.get("compare")
    comparer = _COMPARERS.get(kind) if isinstance(kind, str) else None
    if comparer is None:
        raise ValueError(f"unknown compare kind {kind!r}; use one of {', '.join(COMPARE_KINDS)}")
    return comparer(value, reference, rule)


def kendall_tau(order: Sequence[str], reference: Sequence[str]) -> float:
    """Kendall's tau between two orderings of ids, over the ids present in both.

    1.0 is the same order, -1.0 the reverse; fewer than two shared ids give 1.0.
    """
    position = {item: i for i, item in enumerate(_unique(reference))}
    ranks = [position[item] for item in _unique(order) if item in position]
    n = len(ranks)
    if n < 2:
        return 1.0
    balance = sum(1 if ranks[i] < ranks[j] else -1 for i in range(n) for j in range(i + 1, n))
    return balance / (n * (n - 1) / 2)


def top1_agreement(order: Sequence[str], reference: Sequence[str]) -> bool:
    """Whether both orderings put the same id first (False when either is empty)."""
    return bool(order) and bool(reference) and order[0] == reference[0]


def _relevance_from(reference: Sequence[str], k: int) -> dict[str, float]:
    # Without explicit grades the reference's top k get k, k-1, ..., 1.
    return {item: float(k - i) for i, item in enumerate(_unique(reference)[:k])}


def _ranking_failure(
    order: Sequence[str],
    reference: Sequence[str],
    relevance: Mapping[str, float] | None,
    rule: Mapping[str, Any],
    tau: float,
) -> str | None:
    min_tau = float(rule.get("min_tau", 0.0))
    if tau < min_tau:
        return f"kendall_tau {tau:.2f} < {min_tau:.2f}"
    min_top1 = rule.get("min_top1")
    if min_top1 is not None and not isinstance(min_top1, bool):
        raise ValueError(f"min_top1 must be true or false, got {min_top1!r}")
    if min_top1 and not top1_agreement(order, reference):
        return "top1 disagrees"
    if rule.get("min_ndcg") is not None:
        k = int(rule.get("k", 5))
        grades = relevance if relevance is not None else _relevance_from(reference, k)
        ndcg, min_ndcg = ndcg_at_k(order, grades, k), float(rule["min_ndcg"])
        if ndcg < min_ndcg:
            return f"ndcg@{k} {ndcg:.2f} < {min_ndcg:.2f}"
    return None


def compare_ranking(
    order: Sequence[str],
    reference_order: Sequence[str],
    relevance: Mapping[str, float] | None,
    rule: Mapping[str, Any],
) -> FieldResult:
    """Compare a ranking with the known-good one by order only; the score is Kendall's tau.

    Thresholds: ``min_tau`` (default 0.0), ``min_top1`` (a bool), ``min_ndcg`` with ``k``
    (default 5). Without ``relevance``, NDCG grades the reference's top k as k, k-1, ..., 1.
    With graded ``relevance`` the score is :func:`kendall_tau_graded`: swaps of equally
    graded candidates cost nothing.
    """
    if relevance is not None:
        tau = kendall_tau_graded(order, relevance)
    else:
        tau = kendall_tau(order, reference_order)
    failure = _ranking_failure(order, reference_order, relevance, rule, tau)
    return FieldResult(match=failure is None, score=tau, detail=failure)


_QUOTES = str.maketrans(
    dict.fromkeys("\u2018\u2019\u201a\u201b\u2032", "'")
    | dict.fromkeys("\u201c\u201d\u201e\u201f\u2033", '"')
    | dict.fromkeys("\u2010\u2011\u2013\u2014", "-")
)
_EDGES = string.punctuation + string.whitespace


def normalize_for_grounding(text: str) -> str:
    """Text reduced for substring search: NFKC, casefolded, straight quotes, single spaces.

    Punctuation around the whole text is stripped, so ``"Acme Ltd."`` finds ``acme ltd``.
    """
    folded = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return " ".join(folded.split()).strip(_EDGES)


def _as_strings(values: Any) -> list[str]:
    items = [values] if isinstance(values, str | int | float) else list(values or [])
    return [str(value) for value in items if value is not None]


def ungrounded(values: Any, document: str) -> list[str]:
    """The extracted strings that do not occur in the document, compared after normalizing.

    ``values`` is a string, a number or a list of them; numbers are compared as ``str(n)``.
    Strings that normalize to nothing are never reported.
    """
    haystack = normalize_for_grounding(document)
    return [
        value
        for value in _as_strings(values)
        if (needle := normalize_for_grounding(value)) and needle not in haystack
    ]
