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
per sequence, a Gram matrix), only which sequence they belong to. Steps beyond a sequence's
`sequence_lens` are not computed by the op: they are no points (zeroed, not counted, and not
averaged over by the 'mean' reduction).

This module imports numpy only.
"""

from __future__ import annotations

import numpy as np

from .layers import RecurrentGeometry
from .sensitivity import DenseAccumulator, _Accumulator


class _Gathered:
    """What a recurrent accumulator needs of one batch, arriving tensor by tensor from capture.

    `parts` names the kinds it waits for ('x' or 'Y', plus 'initial_h' and 'sequence_lens' when
    they are run-time tensors); constants are given at construction. Once every part of a batch
    has arrived, `complete` receives them all.
    """

    def __init__(self, parts: tuple[str, ...], constants: dict[str, np.ndarray | None]) -> None:
        self._parts = parts
        self._constants = constants
        self._pending: dict[str, np.ndarray] = {}

    def feeders(self) -> dict[str, _Feeder]:
        """Kind ('x', 'Y', 'initial_h', 'sequence_lens') -> what capture calls with that tensor."""
        return {kind: _Feeder(self, kind) for kind in self._parts}

    def receive(self, kind: str, x: np.ndarray) -> None:
        self._pending[kind] = np.asarray(x)
        if all(part in self._pending for part in self._parts):
            got = {**self._constants, **self._pending}
            self._pending = {}
            self.complete(got)

    def complete(self, got: dict[str, np.ndarray | None]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _parts(first: str, geom: RecurrentGeometry, constants: dict[str, np.ndarray | None]) -> tuple[str, ...]:
    """The run-time tensors a recurrent layer's batch is made of."""
    wanted = [first]
    if geom.hidden and geom.initial_h and constants.get("initial_h") is None:
        wanted.append("initial_h")
    if geom.sequence_lens and constants.get("sequence_lens") is None:
        wanted.append("sequence_lens")
    return tuple(wanted)


def step_mask(lengths: np.ndarray | None, batch: int, steps: int) -> np.ndarray | None:
    """`[B, T]`: which steps each sequence computes (all when `sequence_lens` is absent)."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape[0] != batch:
        raise ValueError(f"sequence_lens of {lengths.shape[0]} entries for a batch of {batch}")
    return np.arange(steps)[None, :] < lengths[:, None]


class SequenceInputAccumulator(_Gathered, DenseAccumulator):
    """W of a recurrent op: a dense layer over the time steps of X, one sample per sequence;
    steps beyond a sequence's `sequence_lens` are never computed, so they are not points."""

    def __init__(
        self,
        rows: np.ndarray,
        geom: RecurrentGeometry,
        sequence_lens: np.ndarray | None = None,
        **kwargs: object,
    ) -> None:
        DenseAccumulator.__init__(self, rows, **kwargs)  # type: ignore[arg-type]
        constants = {"sequence_lens": sequence_lens}
        _Gathered.__init__(self, _parts("x", geom, constants), constants)
        self.geom = geom

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        """One batch's X as the op reads it (with the constant `sequence_lens`, if any)."""
        self.complete({**self._constants, "x": x})

    def complete(self, got: dict[str, np.ndarray | None]) -> None:
        x = np.asarray(got["x"], dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"{self.geom.op} input of rank {x.ndim}, expected 3")
        x = x.swapaxes(0, 1) if self.geom.layout == 0 else x  # [B, T, I]
        DenseAccumulator.update(self, x, step_mask(got.get("sequence_lens"), x.shape[0], x.shape[1]))


class HiddenStateAccumulator(_Gathered, _Accumulator):
    """R of a recurrent op: the states `h_{t-1}` of each direction, from Y and `initial_h`
    (and `sequence_lens`: the steps a sequence computes)."""

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
        sequence_lens: np.ndarray | None = None,
    ) -> None:
        _Accumulator.__init__(
            self,
            rows,
            geom.directions,
            reduction,
            compute_sensitivity,
            terms,
            gram,
            max_points_per_sample,
            seed,
        )
        constants = {"initial_h": initial_h, "sequence_lens": sequence_lens}
        _Gathered.__init__(self, _parts("Y", geom, constants), constants)
        self.geom = geom

    def complete(self, got: dict[str, np.ndarray | None]) -> None:
        self.update(got["Y"], got.get("initial_h"), got.get("sequence_lens"))  # type: ignore[arg-type]

    def update(
        self, y: np.ndarray, initial_h: np.ndarray | None = None, sequence_lens: np.ndarray | None = None
    ) -> None:
        """`y`: the op's Y output of one batch; `initial_h` as the op reads it (None: zeros)."""
        points, mask = hidden_state_points(y, initial_h, self.geom, sequence_lens)  # [B, dirs, H, T]
        if points.shape[2] != self.rows.shape[1]:
            raise ValueError(
                f"hidden states of {points.shape[2]} units, the weight expects {self.rows.shape[1]}"
            )
        self._accumulate(points, valid=None if mask is None else mask.sum(axis=1))


class _Feeder:
    """One tensor's entry point into a recurrent accumulator (capture's accumulator protocol)."""

    def __init__(self, owner: _Gathered, kind: str) -> None:
        self.owner, self.kind = owner, kind

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        self.owner.receive(self.kind, x)


def hidden_state_points(
    y: np.ndarray,
    initial_h: np.ndarray | None,
    geom: RecurrentGeometry,
    sequence_lens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The states each direction's R multiplies, as points `[B, dirs, hidden, T]`, and the
    `[B, T]` mask of the steps each sequence computes (None: all).

    `y` is `[seq, dirs, batch, hidden]` (layout 0) or `[batch, seq, dirs, hidden]` (layout 1);
    `initial_h` is `[dirs, batch, hidden]` or `[batch, dirs, hidden]`, or None for zeros. With
    `sequence_lens`, a sequence of length L computes steps 0..L-1 only: the reverse direction
    starts at step L-1 from `initial_h`, and the points of steps L.. are zero (not computed).
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 4:
        raise ValueError(f"{geom.op} output Y of rank {y.ndim}, expected 4")
    states = y.transpose(2, 1, 3, 0) if geom.layout == 0 else y.transpose(0, 2, 3, 1)  # [B, dirs, H, T]
    batch, dirs, hidden, steps = states.shape
    if initial_h is None:
        h0 = np.zeros((batch, dirs, hidden), dtype=np.float32)
    else:
        h0 = np.asarray(initial_h, dtype=np.float32)
        h0 = np.broadcast_to(h0.transpose(1, 0, 2) if geom.layout == 0 else h0, (batch, dirs, hidden))
    mask = step_mask(sequence_lens, batch, steps)
    lengths = np.full(batch, steps) if mask is None else mask.sum(axis=1)
    out = np.zeros((batch, dirs, hidden, steps), dtype=np.float32)  # a short sequence's tail: 0
    for d in range(dirs):
        backwards = geom.reverse or d == 1
        if backwards:  # step t reads h from step t+1; a sequence's last step reads initial_h
            out[:, d, :, : steps - 1] = states[:, d, :, 1:]
            out[np.arange(batch)[lengths > 0], d, :, lengths[lengths > 0] - 1] = h0[lengths > 0, d]
        else:
            out[:, d, :, 0] = h0[:, d]
            out[:, d, :, 1:] = states[:, d, :, : steps - 1]
    if mask is not None:
        out *= mask[:, None, None, :]
    return out, mask
