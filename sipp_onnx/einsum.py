"""Einsum nodes that are dense layers in disguise.

jax2tf and TensorFlow exports write dense layers as `Einsum` with one constant operand:
`bij,jk->bik`, `...j,jk->...k`, Keras' `EinsumDense` `abc,cde->abde` (multi-head projections) or
`abcd,cde->abe` (their output projection). Such a node is a MatMul of the activation's
contracted axes with the weight viewed as a matrix, so it is pruned as one, on the canonical rows
of `layers`, when the equation is a plain contraction:

- the weight's indices are a block C of contracted indices and a block F of free ones, in either
  order (C then F: the matrix `[prod C, prod F]`, layout COLUMNS; F then C: `[prod F, prod C]`,
  ROWS), no index repeated;
- the activation holds every index of C exactly once, and its other indices are batch axes
  (sequence, tokens) that reach the output unchanged: none is summed, none is shared with the
  weight; `...` only as its leading batch block, and then in the output too;
- the output holds every index but C.

The activation axes of C (counted from its end, so that `...` needs no known rank) are where its
points lie; they are moved last by the accumulator. Where the output puts F does not matter for
the weights; a bias Add after the node can take the refit's shift only when F ends the output.

This module depends on `layers` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from .layers import WeightLayout

ELLIPSIS = "..."


class EinsumRejected(ValueError):
    """The equation is not a dense layer; the message says why (one line)."""


@dataclass(frozen=True)
class DenseEinsum:
    """How an Einsum node's constant operand is a dense layer's weight."""

    weight_slot: int
    """Which operand (0 or 1) is the weight."""
    layout: WeightLayout
    """COLUMNS when the weight's contracted indices come first, ROWS when its free ones do."""
    contracted: tuple[int, ...]
    """Dims of the contracted indices, in the weight's order (their product is K)."""
    free: tuple[int, ...]
    """Dims of the weight's free indices (the output neurons; their product is N)."""
    input_axes: tuple[int, ...]
    """Activation axes of the contracted indices in the weight's order, counted from the end;
    () for the plain case of one contracted index on the activation's last axis."""
    bias_problem: str = ""
    """Why a bias Add after the node cannot take the bias refit ('' when it can)."""

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight as the matrix the layer multiplies, in its layout."""
        k, n = prod(self.contracted), prod(self.free)
        return (k, n) if self.layout is WeightLayout.COLUMNS else (n, k)


def dense_einsum(
    equation: str, weight_slot: int, weight_shape: tuple[int, ...], input_rank: int | None = None
) -> DenseEinsum:
    """The dense-layer reading of a two-operand Einsum, or `EinsumRejected` with the reason.

    `weight_shape` is the constant operand's shape; `input_rank` the activation's rank when
    known (it is only checked against the equation).
    """
    terms, output, implicit = _split(equation)
    if len(terms) != 2:
        raise EinsumRejected(f"{len(terms)} operands (a dense layer has an activation and a weight)")
    w_idx, a_idx = terms[weight_slot], terms[1 - weight_slot]
    if ELLIPSIS in w_idx:
        raise EinsumRejected("the weight's subscripts have '...' (broadcasting over the weight)")
    if len(w_idx) != len(weight_shape):
        raise EinsumRejected(
            f"the weight's subscripts {''.join(w_idx)!r} do not match its rank {len(weight_shape)}"
        )
    if ELLIPSIS in a_idx[1:]:
        raise EinsumRejected("'...' not at the start of the activation's subscripts")
    for label, idx in (("weight", w_idx), ("activation", a_idx), ("output", output)):
        repeated = sorted({i for i in idx if idx.count(i) > 1 and i != ELLIPSIS})
        if repeated:
            raise EinsumRejected(f"index {repeated[0]!r} repeated in the {label} (a diagonal or trace)")
    letters = [i for i in a_idx if i != ELLIPSIS]
    if input_rank is not None and (
        len(letters) > input_rank if ELLIPSIS in a_idx else len(letters) != input_rank
    ):
        raise EinsumRejected(
            f"the activation's subscripts {''.join(a_idx)!r} do not match its rank {input_rank}"
        )
    if (ELLIPSIS in a_idx) != (ELLIPSIS in output):
        raise EinsumRejected(
            "'...' in the activation but not the output (a sum over its batch axes)"
            if ELLIPSIS in a_idx
            else "'...' in the output but in no operand"
        )
    unknown = [i for i in output if i != ELLIPSIS and i not in w_idx and i not in a_idx]
    if unknown:
        raise EinsumRejected(f"output index {unknown[0]!r} is in no operand")
    contracted = [i for i in w_idx if i in a_idx and i not in output]
    free = [i for i in w_idx if i not in a_idx]
    for i in w_idx:
        if i in a_idx and i in output:
            raise EinsumRejected(f"index {i!r} is in both operands and the output (one product per {i!r})")
        if i not in a_idx and i not in output:
            raise EinsumRejected(f"the weight is summed over index {i!r}")
    for i in letters:
        if i not in w_idx and i not in output:
            raise EinsumRejected(f"the activation is summed over index {i!r}")
    if not contracted:
        raise EinsumRejected("no index is contracted (an outer product)")
    if not free:
        raise EinsumRejected("the weight has no free index (no output neurons)")
    if w_idx == contracted + free:
        layout = WeightLayout.COLUMNS
    elif w_idx == free + contracted:
        layout = WeightLayout.ROWS
    else:
        raise EinsumRejected(
            f"the weight's subscripts {''.join(w_idx)!r} interleave contracted "
            f"({''.join(contracted)!r}) and free ({''.join(free)!r}) indices"
        )
    axes = tuple(a_idx.index(i) - len(a_idx) for i in contracted)
    dims = dict(zip(w_idx, weight_shape, strict=True))
    return DenseEinsum(
        weight_slot,
        layout,
        tuple(dims[i] for i in contracted),
        tuple(dims[i] for i in free),
        () if axes == (-1,) else axes,
        _bias_problem(output, free, implicit),
    )


def _bias_problem(output: list[str], free: list[str], implicit: bool) -> str:
    if implicit and any(i.isupper() for i in output) and any(i.islower() for i in output):
        # ONNX Runtime sorts lower before upper case, numpy the other way round
        return "no bias: an implicit Einsum output of mixed-case indices has no agreed axis order"
    if output[len(output) - len(free) :] != free:
        return (
            f"no bias: the Einsum output {''.join(output)!r} does not end with the weight's "
            f"free indices {''.join(free)!r}, so a bias Add does not broadcast along them"
        )
    return ""


def _split(equation: str) -> tuple[list[list[str]], list[str], bool]:
    """(operand subscripts, output subscripts, whether the output was implicit)."""
    eq = "".join(equation.split())
    if eq.count("->") > 1:
        raise EinsumRejected(f"cannot parse equation {equation!r}")
    lhs, arrow, rhs = eq.partition("->")
    terms = [_indices(term, equation) for term in lhs.split(",")]
    if arrow:
        return terms, _indices(rhs, equation), False
    # ONNX / numpy implicit mode: '...' first, then the indices used once, sorted
    letters = [i for term in terms for i in term if i != ELLIPSIS]
    singles = sorted(i for i in set(letters) if letters.count(i) == 1)
    ellipsis = [ELLIPSIS] if any(ELLIPSIS in term for term in terms) else []
    return terms, ellipsis + singles, True


def _indices(term: str, equation: str) -> list[str]:
    """'b...ij' -> ['b', '...', 'i', 'j']."""
    out: list[str] = []
    rest = term
    while rest:
        if rest.startswith(ELLIPSIS):
            if ELLIPSIS in out:
                raise EinsumRejected(f"'...' twice in {term!r}")
            out.append(ELLIPSIS)
            rest = rest[3:]
        elif rest[0].isascii() and rest[0].isalpha():
            out.append(rest[0])
            rest = rest[1:]
        else:
            raise EinsumRejected(f"cannot parse equation {equation!r}")
    return out
