"""Answers drawn from a backend's class probabilities, as a sampling LLM gives them.

A classifying backend knows P(label | document). :func:`choices` turns that into what the
request asked for: ``n`` answers drawn at the request's ``temperature`` (the probabilities
raised to ``1 / temperature`` and renormalized; 0 or none takes the most likely label every
time), reproducibly (the draws depend only on ``seed``, the document and the sample's
number), and, with ``logprobs``, each answer's tokens with their log probabilities. The label
is the one token that carries uncertainty (the JSON around it follows from it), so the
answer's sequence probability is the probability of its label, and ``top_logprobs`` lists
the most likely other labels at that position.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from typing import Any

from stillhouse.servers.teacher.protocol import ChatRequest, Choice, render_answer

__all__ = ["choices", "draw"]


def draw(probabilities: Sequence[float], temperature: float | None, rng: random.Random) -> int:
    """One label's index drawn at ``temperature`` (None or 0: the most likely)."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    if not temperature:
        return best
    logs = [math.log(max(p, 1e-300)) / temperature for p in probabilities]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    return rng.choices(range(len(probabilities)), weights=weights)[0]


def choices(
    request: ChatRequest, names: Sequence[str], probabilities: Sequence[float]
) -> tuple[Choice, ...]:
    """The request's ``n`` answers over ``names`` with ``probabilities`` (see the module)."""
    digest = hashlib.sha256(request.document.encode()).hexdigest()[:16]
    out = []
    for number in range(request.n):
        rng = random.Random(f"{request.seed or 0}:{digest}:{number}")
        index = draw(probabilities, request.temperature, rng)
        content = render_answer(request, names[index], round(probabilities[index], 4))
        logprobs = _tokens(request, content, names, probabilities, index)
        out.append(Choice(content, logprobs))
    return tuple(out)


def _tokens(
    request: ChatRequest,
    content: str,
    names: Sequence[str],
    probabilities: Sequence[float],
    index: int,
) -> tuple[dict[str, Any], ...] | None:
    """The answer as tokens with log probabilities: the JSON before the label, the label,
    and the rest (certain once the label is chosen)."""
    if not request.logprobs:
        return None
    label = json.dumps(names[index])[1:-1]
    start = content.index(f'"{label}"') + 1
    ranked = sorted(range(len(names)), key=lambda k: -probabilities[k])
    top = [_token(names[k], probabilities[k]) for k in ranked[: request.top_logprobs]]
    return (
        {**_token(content[:start], 1.0), "top_logprobs": []},
        {**_token(label, probabilities[index]), "top_logprobs": top},
        {**_token(content[start + len(label) :], 1.0), "top_logprobs": []},
    )


def _token(text: str, probability: float) -> dict[str, Any]:
    return {
        "token": text,
        "logprob": round(math.log(max(probability, 1e-300)), 6),
        "bytes": list(text.encode()),
    }
