"""One classification member's cached views, held as float32 arrays, and what its tuners
ask of them: the weighted merge of any views at any temperature, its per-row NLL
(memoized: k folds that reach the same views and temperature share the work), the
gradient of the NLL in the view weights, and the exact merge the blend computes.

Losses are computed for every labelled row; a tuner averages them over its training rows,
so that the folds of the out-of-sample estimate can share evaluations.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from kaggle_tta.ops.gate import Gate, needs
from kaggle_tta.ops.merge import VIEW_REDUCERS, Prediction, reduce_views
from kaggle_tta.tuning import losses

MEMO_BYTES = 512 * 2**20  # per-row losses kept per member


@dataclass
class MemberData:
    """A member's views ``z[v]`` ``[N, C]`` (logits, as cached), with its settings."""

    name: str
    views: list[str]
    z: list[np.ndarray]
    activation: str
    merge: str
    seconds: list[float]
    y: np.ndarray
    temperature: float = 1.0  # the pipeline's
    weights: np.ndarray | None = None  # the pipeline's, [V] or [V, C] (None: equal)
    _t: tuple[float, list[np.ndarray]] | None = field(default=None, repr=False)
    _memo: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def linear(self) -> bool:
        """Mean of logits: the temperature scales the merge once (``acc / T``)."""
        return self.merge == "mean"

    def pipeline_weights(self) -> np.ndarray:
        """The pipeline's view weights, normalized ``[V]`` or ``[V, C]``."""
        w = np.ones(len(self.views)) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        return w / w.sum(axis=0, keepdims=True)

    def transformed(self, temperature: float) -> list[np.ndarray]:
        """Each view's transform (VIEW_REDUCERS) at ``temperature``; for mean, the logits
        themselves (the temperature is applied to the sum). The last one is kept."""
        if self.linear:
            return self.z
        if self._t is None or self._t[0] != temperature:
            transform = VIEW_REDUCERS[self.merge][0]
            self._t = (temperature, [transform(z / np.float32(temperature), self.activation) for z in self.z])
        return self._t[1]

    def terms(self, w: np.ndarray, temperature: float) -> tuple[losses.Terms, float]:
        """``([(t_v, w_v)] for the views weighing something, scale)``, the weights normalized
        over the views: the merge's sum, made block by block where it is used."""
        t = self.transformed(temperature)
        w = np.asarray(w, dtype=np.float64)
        total = w.sum(axis=0, keepdims=True)
        w = w / np.where(total > 0, total, 1.0)
        keep = np.flatnonzero(w.reshape(len(t), -1).any(axis=1))
        return [(t[v], w[v].astype(np.float32)) for v in keep], (1.0 / temperature if self.linear else 1.0)

    def acc(
        self, w: np.ndarray, temperature: float, rows: np.ndarray | slice = slice(None)
    ) -> tuple[np.ndarray, float]:
        """``(sum_v w_v t_v, scale)`` for rows, weights normalized over the views."""
        terms, scale = self.terms(w, temperature)
        return losses.combine(terms, rows), scale

    def _key(self, w: np.ndarray, temperature: float) -> tuple:
        w = np.asarray(w, dtype=np.float64)
        total = w.sum(axis=0, keepdims=True)
        return (np.round(w / np.where(total > 0, total, 1.0), 12).tobytes(), np.shape(w), round(float(temperature), 9))

    def loss_rows(
        self, w: np.ndarray, temperature: float, terms: losses.Terms | None = None, scale: float | None = None
    ) -> np.ndarray:
        """Per-row NLL ``[N]`` of the merge with weights ``w`` at ``temperature`` (memoized;
        ``terms`` and ``scale``: the same sum written another way, e.g. a running one)."""
        key = self._key(w, temperature)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        if terms is None:
            terms, scale = self.terms(w, temperature)
        out = losses.nll_rows(terms, self.merge, self.activation, self.y, float(scale))  # type: ignore[arg-type]
        self._memo[key] = out
        while len(self._memo) * out.nbytes > MEMO_BYTES:
            self._memo.popitem(last=False)
        return out

    def loss(self, w: np.ndarray, temperature: float, train: np.ndarray) -> float:
        """Mean NLL over the training rows (``train``: a bool mask or indices)."""
        return float(self.loss_rows(w, temperature)[train].mean())

    def gradient(self, w: np.ndarray, temperature: float, rows: np.ndarray) -> np.ndarray:
        """d(mean NLL over ``rows``)/d(w), the shape of ``w`` (``[V]`` or ``[V, C]``), for
        weights that sum to one over the views (the merge then needs no renormalizing)."""
        t = self.transformed(temperature)
        tb = [x[rows] for x in t]  # gathered once
        scale = np.float32(1.0 / temperature if self.linear else 1.0)
        total = w.sum(axis=0, keepdims=True)
        wn = (w / np.where(total > 0, total, 1.0)).astype(np.float32)
        acc = losses.combine([(x, wn[v]) for v, x in enumerate(tb)], slice(None))
        g = losses.acc_gradient(acc * scale, self.merge, self.activation, self.y[rows]) * scale
        if w.ndim == 2:
            return np.stack([(g * x).mean(axis=0) for x in tb])
        return np.array([float(np.einsum("ij,ij->", g, x) / len(rows)) for x in tb])

    def predict(
        self,
        views: list[str],
        w: np.ndarray | None,
        temperature: float,
        rows: np.ndarray | slice = slice(None),
        gate: Gate | None = None,
        send: np.ndarray | None = None,
    ) -> Prediction:
        """The merge exactly as the blend computes it (kaggle_tta.ops.merge.reduce_views; and
        with an adaptive ``gate``, as dag.MemberSource.masks gives it: the views other than
        the gate's first hold the rows ``needs`` sends on, from the first view's cached
        values). ``send``: those rows given instead (bool ``[N]``, before ``rows``)."""
        at = {v: k for k, v in enumerate(self.views)}
        masks = None
        if gate is not None and not gate.skips_nothing and any(v != gate.first for v in views):
            if send is None:
                send = self.sends(gate)
            masks = [None if v == gate.first else send[rows] for v in views]
        return reduce_views(self.merge, [self.z[at[v]][rows] for v in views], self.activation, w, temperature, masks)

    def sends(self, gate: Gate) -> np.ndarray:
        """The rows (bool ``[N]``) the gate sends on to the member's other views."""
        return needs(self.z[self.views.index(gate.first)], self.activation, gate)

    def probs(self, w: np.ndarray, temperature: float, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        terms, scale = self.terms(w, temperature)
        return losses.probabilities(
            losses.combine([(t, c * np.float32(scale)) for t, c in terms], rows), self.merge, self.activation
        )
