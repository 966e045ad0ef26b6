"""The bag-of-n-grams student: a fastText-style classifier, its optimizer and its wrapper."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional

from student_train.features import Bag, Featurizer, Packed, pack

__all__ = ["BagOfNgrams", "RowAdagrad", "Student", "to_tensors"]

_PREDICT_BATCH = 1_024


class BagOfNgrams(nn.Module):
    """Mean of hashed n-gram embeddings, dropout, then a linear layer to class logits.

    The embedding bag sums with per-id weights, so a document can be given as its distinct
    ids weighted by their share (see :data:`student_train.features.Bag`): the same mean as
    ``mode="mean"`` over every n-gram, for half the work on long texts.
    """

    def __init__(self, buckets: int, dim: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Sparse gradients: one step touches a few thousand rows, not all `buckets` of them.
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="sum", sparse=True)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize as fastText does: small uniform embeddings, a zero output layer."""
        bound = 1.0 / self.embedding.embedding_dim
        nn.init.uniform_(self.embedding.weight, -bound, bound)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(
        self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of shape ``(len(offsets), n_classes)`` for a packed batch of documents.

        Without ``weights`` every id counts equally: the plain mean of each document's ids.
        """
        if weights is None:
            weights = _mean_weights(ids, offsets)
        table = self.embedding.weight
        if torch.is_grad_enabled() and table.requires_grad:
            pooled = _SparseBag.apply(table, ids, offsets, weights)  # type: ignore[no-untyped-call]
        else:
            pooled = self.embedding(ids, offsets, per_sample_weights=weights)
        return self.linear(self.dropout(pooled))  # type: ignore[no-any-return]


class _SparseBag(torch.autograd.Function):
    """A weighted-sum embedding bag whose gradient is one coalesced row per distinct id.

    The stock backward writes a gradient row per (document, id) occurrence and the optimizer
    then sorts and merges them; here the merge is one sparse matrix product, which made a
    training step on BBC articles about twice as fast.
    """

    @staticmethod
    def forward(
        ctx: Any,
        table: torch.Tensor,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(ids, offsets, weights)
        ctx.table_shape = table.shape
        return functional.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        ids, offsets, weights = ctx.saved_tensors
        lengths = torch.diff(offsets, append=offsets.new_tensor([len(ids)]))
        bag_of = torch.repeat_interleave(torch.arange(len(offsets)), lengths)
        sorted_ids, order = torch.sort(ids, stable=True)
        rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # spread[r, d] = weight of distinct id r in document d; its product with the
        # per-document gradient is the gradient of each distinct row.
        with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
            warnings.simplefilter("ignore", UserWarning)
            spread = torch.sparse_csr_tensor(
                starts,
                bag_of[order],
                weights[order],
                (len(rows), len(offsets)),
                check_invariants=False,
            )
        values = spread @ grad
        table_grad = torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, ctx.table_shape, is_coalesced=True, check_invariants=False
        )
        return table_grad, None, None, None


def _mean_weights(ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    ends = torch.cat([offsets[1:], torch.tensor([len(ids)], dtype=offsets.dtype)])
    lengths = ends - offsets
    return (1.0 / lengths.clamp(min=1).float()).repeat_interleave(lengths)


class RowAdagrad:
    """Adagrad for a hashed embedding table: one accumulator per row, only touched rows move.

    Sparse gradients get row-wise Adagrad (each row's accumulator adds the mean square of
    its gradient, as FBGEMM and DLRM train large tables): one float of state per row, and
    none of ``torch.optim.Adagrad``'s sparse-tensor bookkeeping, which took most of a CPU
    step (a BBC step went from about 125 ms to 40 ms). Dense parameters get plain Adagrad,
    with the group's weight decay. It is a plain class because building a
    ``torch.optim.Optimizer`` imports ``torch._dynamo``: two seconds on this machine.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, eps: float = 1e-10) -> None:
        defaults = {"lr": lr, "eps": eps, "weight_decay": 0.0}
        self.param_groups = [
            {**defaults, **group, "params": list(group["params"])} for group in groups
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        """Forget the gradients of the last step."""
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    self._sparse_update(param, param.grad, group)
                else:
                    self._dense_update(param, param.grad, group)

    def _sparse_update(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
    ) -> None:
        state = self.state.setdefault(param, {})
        if "row_sum" not in state:
            state["row_sum"] = param.new_zeros(param.shape[0])
        sums: torch.Tensor = state["row_sum"]
        rows, values = _sparse_rows(grad)
        row_sums = sums.index_select(0, rows).add_(values.square().mean(dim=1))
        sums.index_copy_(0, rows, row_sums)
        scale = row_sums.sqrt_().add_(group["eps"]).reciprocal_().mul_(-group["lr"])
        param.index_add_(0, rows, values * scale.unsqueeze(1))

    def _dense_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state.setdefault(param, {})
        if "sum" not in state:
            state["sum"] = torch.zeros_like(param)
        sums: torch.Tensor = state["sum"]
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        sums.addcmul_(grad, grad)
        param.addcdiv_(grad, sums.sqrt().add_(group["eps"]), value=-group["lr"])


def _sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids and rows of a sparse gradient, each row once (coalescing only if needed).

    Autograd drops the "coalesced" flag when it stores a gradient, so sorting rows that are
    already distinct and ordered, as the embedding bag's are, is skipped by checking them.
    """
    rows, values = grad._indices()[0], grad._values()
    if bool((rows[1:] > rows[:-1]).all()):
        return rows, values
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def to_tensors(bags: Sequence[Bag]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack bags into the ``(ids, offsets, weights)`` tensors of a forward pass."""
    ids, offsets, weights = pack(bags)
    return torch.from_numpy(ids), torch.from_numpy(offsets), torch.from_numpy(weights)


class Student:
    """A trained student ready to label texts: the model, its labels and its featurizer."""

    def __init__(self, model: BagOfNgrams, labels: Sequence[str], featurizer: Featurizer) -> None:
        self.model = model.eval()
        self.labels = list(labels)
        self.featurizer = featurizer
        self._fold: tuple[Any, npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """The most likely label of each text and its probability."""
        probs = self.predict_proba(texts)
        best = probs.argmax(axis=1)
        return [(self.labels[int(k)], float(probs[row, k])) for row, k in enumerate(best)]

    def predict_proba(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Class probabilities, one row per text, columns in the order of ``labels``."""
        chunks = [np.zeros((0, len(self.labels)), dtype=np.float32)]
        for start in range(0, len(texts), _PREDICT_BATCH):
            chunks.append(
                self._probabilities(
                    self.featurizer.packed(texts[start : start + _PREDICT_BATCH], distinct=False)
                )
            )
        return np.concatenate(chunks)

    def predict_proba_bags(self, bags: Sequence[Bag]) -> npt.NDArray[np.float32]:
        """Class probabilities for documents that are already featurized."""
        chunks = [np.zeros((0, len(self.labels)), dtype=np.float32)]
        for start in range(0, len(bags), _PREDICT_BATCH):
            chunks.append(self._probabilities(pack(bags[start : start + _PREDICT_BATCH])))
        return np.concatenate(chunks)

    def _probabilities(self, packed: Packed) -> npt.NDArray[np.float32]:
        """Softmax of the model's logits (as in eval mode), computed on the folded table."""
        ids, offsets, weights = packed
        table, bias = self._folded()
        rows = np.take(table, ids, axis=0)
        if len(offsets) == 1:  # one document (a served request): one matrix-vector product
            logits = (weights @ rows)[None, :] if len(ids) else np.zeros((1, len(bias)))
        else:
            rows *= weights[:, None]
            logits = np.zeros((len(offsets), len(bias)), dtype=np.float32)
            if len(ids):
                empty = np.empty(len(offsets), dtype=bool)
                np.equal(offsets[1:], offsets[:-1], out=empty[:-1])
                empty[-1] = offsets[-1] == len(ids)
                filled = ~empty
                logits[filled] = np.add.reduceat(rows, offsets[filled], axis=0)
        probabilities: npt.NDArray[np.float32] = logits.astype(np.float32, copy=False) + bias
        probabilities -= probabilities.max(axis=1, keepdims=True)
        np.exp(probabilities, out=probabilities)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities

    def _folded(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The embedding table multiplied through the linear layer (``buckets x classes``)
        and the bias: the model is linear after the bag, so a document's logits are the
        weighted sum of its ids' rows here plus the bias. Gathering 5 numbers an id instead
        of ``dim`` made predicting one BBC article four times as fast as the torch forward.
        Refolded when training has changed the parameters since."""
        model = self.model
        params = (model.embedding.weight, model.linear.weight, model.linear.bias)
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = self._fold
        if cached is None or cached[0] != key:
            with torch.no_grad():
                table = (params[0] @ params[1].T).float().cpu().numpy()
                bias = params[2].float().cpu().numpy()
            cached = self._fold = (key, np.ascontiguousarray(table), bias.copy())
        return cached[1], cached[2]
