"""Calibration points of LSTM/GRU/RNN weights (ONNX recurrent-op semantics), streamed.

- W `[dirs, gates*hidden, input]` reads every time step's input `x_t`: the points are the steps
  of X, grouped by sequence (X is `[seq, batch, input]` with layout 0, `[batch, seq, input]`
  with layout 1). Every direction reads the same steps, so the rows of all directions share
  one set of points.
- R `[dirs, gates*hidden, hidden]` reads the hidden state before each step, `h_{t-1}`: for the
  forward direction `initial_h` (zeros when absent), then Y's steps 0..T-2; for the reverse
  direction Y's steps T-1..1 and `initial_h`. Each direction's rows read only its own states,
  so the directions are groups, like a grouped Conv's.

Both are exact: Y is the op's own output, which ONNX Runtime returns like any other tensor.
The order of the points within a sequence does not matter to any statistic (a max, a mean
per sequence, a Gram matrix), only which sequence they belong to. Padding steps of sequences
shorter than the batch's (`sequence_lens`) add zero points: nothing to a max or a Gram matrix.

This module imports numpy only.
"""

from __future__ import annotations

import numpy as np

from .layers import RecurrentGeometry
from .sensitivity import DenseAccumulator, _Accumulator


class SequenceInputAccumulator(DenseAccumulator):
    """W of a recurrent op: a dense layer over the time steps of X, one sample per sequence."""

    def __init__(self, rows: np.ndarray, geom: RecurrentGeometry, **kwargs: object) -> None:
        super().__init__(rows, **kwargs)  # type: ignore[arg-type]
        self.geom = geom

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"{self.geom.op} input of rank {x.ndim}, expected 3")
        super().update(x.swapaxes(0, 1) if self.geom.layout == 0 else x, token_mask)


class HiddenStateAccumulator(_Accumulator):
    """R of a recurrent op: the states `h_{t-1}` of each direction, from Y and `initial_h`.

    Capture hands over Y and (when it is a run-time tensor) `initial_h` one at a time, through
    the two `feeders()`; each batch's points are built once both have arrived. A constant
    `initial_h` is given at construction.
    """

    def __init__(
        self,
        rows: np.ndarray,
        geom: RecurrentGeometry,
        initial_h: np.ndarray | None = None,
        reduction: str = "max",
        compute_sensitivity: bool = True,
        terms: str = "signed",
        gram: bool = False,
        max_points_per_sample: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            rows, geom.directions, reduction, compute_sensitivity, terms, gram, max_points_per_sample, seed
        )
        self.geom = geom
        self._constant_h = None if initial_h is None else np.asarray(initial_h, dtype=np.float32)
        self._captured_h = bool(geom.initial_h) and initial_h is None
        self._pending: dict[str, np.ndarray] = {}

    def feeders(self) -> dict[str, _Feeder]:
        """Tensor name -> what capture calls with that tensor of every batch."""
        out = {"Y": _Feeder(self, "Y")}
        if self._captured_h:
            out["initial_h"] = _Feeder(self, "initial_h")
        return out

    def receive(self, kind: str, x: np.ndarray) -> None:
        self._pending[kind] = np.asarray(x, dtype=np.float32)
        if "Y" in self._pending and (not self._captured_h or "initial_h" in self._pending):
            y = self._pending.pop("Y")
            h0 = self._pending.pop("initial_h", self._constant_h)
            self.update(y, h0)

    def update(self, y: np.ndarray, initial_h: np.ndarray | None = None) -> None:
        """`y`: the op's Y output of one batch; `initial_h` as the op reads it (None: zeros)."""
        points = hidden_state_points(y, initial_h, self.geom)  # [B, dirs, H, T]
        if points.shape[2] != self.rows.shape[1]:
            raise ValueError(
                f"hidden states of {points.shape[2]} units, the weight expects {self.rows.shape[1]}"
            )
        self._accumulate(points)


class _Feeder:
    """One tensor's entry point into a `HiddenStateAccumulator` (capture's accumulator protocol)."""

    def __init__(self, owner: HiddenStateAccumulator, kind: str) -> None:
        self.owner, self.kind = owner, kind

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        self.owner.receive(self.kind, x)


def hidden_state_points(y: np.ndarray, initial_h: np.ndarray | None, geom: RecurrentGeometry) -> np.ndarray:
    """The states each direction's R multiplies, as points `[B, dirs, hidden, T]`.

    `y` is `[seq, dirs, batch, hidden]` (layout 0) or `[batch, seq, dirs, hidden]` (layout 1);
    `initial_h` is `[dirs, batch, hidden]` or `[batch, dirs, hidden]`, or None for zeros.
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 4:
        raise ValueError(f"{geom.op} output Y of rank {y.ndim}, expected 4")
    states = y.transpose(2, 1, 3, 0) if geom.layout == 0 else y.transpose(0, 2, 3, 1)  # [B, dirs, H, T]
    batch, dirs, hidden, steps = states.shape
    if initial_h is None:
        h0 = np.zeros((batch, dirs, hidden, 1), dtype=np.float32)
    else:
        h0 = np.asarray(initial_h, dtype=np.float32)
        h0 = (h0.transpose(1, 0, 2) if geom.layout == 0 else h0)[..., None]  # [B, dirs, H, 1]
        h0 = np.broadcast_to(h0, (batch, dirs, hidden, 1))
    out = np.empty((batch, dirs, hidden, steps), dtype=np.float32)
    for d in range(dirs):
        backwards = geom.reverse or d == 1
        if backwards:  # step t reads h from step t+1; the last step reads initial_h
            out[:, d, :, : steps - 1] = states[:, d, :, 1:]
            out[:, d, :, steps - 1] = h0[:, d, :, 0]
        else:
            out[:, d, :, 0] = h0[:, d, :, 0]
            out[:, d, :, 1:] = states[:, d, :, : steps - 1]
    return out
