"""Components and groups of a channel graph, and what keeping a subset of them costs.

A component (a union-find root of `channels`) is removed whole. Components whose nodes were
created by the same layers form a group: the 64 channels of a residual stream, the 1536 FFN
neurons of one transformer layer, its 12 heads. `Plan` answers, for any choice of kept
components, the MACs and parameters of every weight layer, which is what the allocator and the
report need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .channels import ChannelGraph, LayerInfo


@dataclass(frozen=True)
class Group:
    """Components removed by the same layers, with what the report says of them."""

    index: int
    name: str
    """The first layer whose output channels are in it."""
    kind: str
    """'channels' (conv), 'neurons' (Gemm/MatMul outputs), 'heads' (attention), 'groups'
    (channels of grouped convs, removed a conv group at a time)."""
    components: np.ndarray
    """Component ids (indices into `Plan.roots`)."""
    layers: tuple[int, ...]
    """Indices (into `Plan.layers`) of the layers that read or write its channels."""
    width: int
    """Channels per component in each layer that produces them (1, or the head size)."""
    frozen: int
    """Components that must stay."""
    reasons: tuple[str, ...]
    """Why those must stay (distinct reasons)."""

    @property
    def size(self) -> int:
        return len(self.components)

    @property
    def prunable(self) -> bool:
        return self.frozen < self.size


class Plan:
    """A channel graph seen as components, groups and per-layer cost accounting."""

    def __init__(self, graph: ChannelGraph, positions: dict[int, int] | None = None) -> None:
        self.graph = graph
        self.layers: list[LayerInfo] = graph.layers
        comp = graph.component_of()
        self.roots, self.component = np.unique(comp, return_inverse=True)
        """`component[node]`: the component id of each channel node."""
        n = len(self.roots)
        self.frozen_reason: list[str] = [""] * n
        for node, reason in graph.frozen.items():
            c = int(self.component[node])
            if not self.frozen_reason[c]:
                self.frozen_reason[c] = reason
        self.frozen = np.array([bool(r) for r in self.frozen_reason], dtype=bool)
        self.positions = {i: layer.positions for i, layer in enumerate(self.layers)}
        if positions:
            self.positions.update(positions)
        self.layer_in: list[np.ndarray | None] = []
        self.layer_out: list[np.ndarray | None] = []
        for layer in self.layers:
            self.layer_in.append(self.components_of(layer.input) if layer.in_layout else None)
            self.layer_out.append(self.components_of(layer.output) if layer.out_layout else None)
        self.groups = self._groups()
        self.group_of = np.full(n, -1, dtype=np.int64)
        for g in self.groups:
            self.group_of[g.components] = g.index

    def components_of(self, tensor: str) -> np.ndarray:
        """Component id of each channel position of `tensor`."""
        return np.asarray(self.component[self.graph.layouts[tensor]], dtype=np.int64)

    def _groups(self) -> list[Group]:
        origin = np.asarray(self.graph.origin, dtype=np.int64)
        n = len(self.roots)
        members: list[set[int]] = [set() for _ in range(n)]
        counts = np.bincount(self.component, minlength=n)
        for node, layer in enumerate(origin.tolist()):
            members[int(self.component[node])].add(layer)
        readers: list[set[int]] = [set() for _ in range(n)]
        for i, read in enumerate(self.layer_in):
            if read is not None:
                for c in np.unique(read).tolist():
                    readers[c].add(i)
        by_signature: dict[tuple[int, ...], list[int]] = {}
        for c in range(n):
            key = tuple(sorted(members[c]))
            by_signature.setdefault(key, []).append(c)
        groups: list[Group] = []
        for key, comps in sorted(by_signature.items(), key=lambda kv: min(kv[1])):
            producers = [k for k in key if k >= 0]
            first = self.layers[producers[0]] if producers else None
            width = max(1, int(counts[comps[0]]) // max(1, len(key)))
            ops = {self.layers[k].op for k in producers}
            grouped = any(self.layers[k].grouped for k in producers)
            if width > 1 and ops <= {"MatMul", "Gemm"}:
                kind = "heads"
            elif width > 1 and grouped:
                kind = "groups"
            elif "Conv" in ops:
                kind = "channels"
            else:
                kind = "neurons"
            touched = sorted(set(producers).union(*(readers[c] for c in comps)))
            frozen = [c for c in comps if self.frozen[c]]
            reasons = tuple(dict.fromkeys(self.frozen_reason[c] for c in frozen))
            groups.append(
                Group(
                    len(groups),
                    first.name if first is not None else "(constant channels)",
                    kind,
                    np.asarray(comps, dtype=np.int64),
                    tuple(touched),
                    width,
                    len(frozen),
                    reasons,
                )
            )
        return groups

    # -- cost of a choice of kept components

    def layer_counts(self, keep: np.ndarray, i: int) -> tuple[int, int]:
        """(kept outputs, kept input channels) of layer `i` for the kept components `keep`."""
        layer = self.layers[i]
        comps_out, comps_in = self.layer_out[i], self.layer_in[i]
        kept_out = int(keep[comps_out].sum()) if comps_out is not None else layer.n_out
        kept_in = int(keep[comps_in].sum()) if comps_in is not None else layer.in_channels
        return kept_out, kept_in

    def layer_macs(self, keep: np.ndarray, i: int) -> int:
        kept_out, kept_in = self.layer_counts(keep, i)
        return self.layers[i].macs(kept_out, kept_in, self.positions[i] or 0)

    def layer_params(self, keep: np.ndarray, i: int) -> int:
        kept_out, kept_in = self.layer_counts(keep, i)
        return self.layers[i].params(kept_out, kept_in)

    def macs(self, keep: np.ndarray) -> int:
        return sum(self.layer_macs(keep, i) for i in range(len(self.layers)))

    def params(self, keep: np.ndarray) -> int:
        return sum(self.layer_params(keep, i) for i in range(len(self.layers)))

    def producers(self, group: Group) -> list[int]:
        """Layers whose output channels are the group's (its MACs and parameters in reports)."""
        return [
            i
            for i in group.layers
            if (out := self.layer_out[i]) is not None and int(self.group_of[out[0]]) == group.index
        ]

    def all_kept(self) -> np.ndarray:
        return np.ones(len(self.roots), dtype=bool)

    def kept_positions(self, keep: np.ndarray, tensor: str) -> np.ndarray:
        """Boolean mask over the channel positions of `tensor`."""
        return np.asarray(keep[self.components_of(tensor)], dtype=bool)

    def unknown_positions(self) -> list[int]:
        """Layers whose output positions per sample are not known from the graph alone."""
        return [i for i, p in self.positions.items() if p is None]
