"""Boolean circuits: layers of gate modules with known wiring (SPEC §1).

A circuit is the ground truth a modular network can try to recover: its truth
table is the dataset, its wiring is the "known routing", and the gate type of
each slot says which module of a shared library the slot should use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Gate functions take a uint8 array [rows, k] and return [rows] in {0, 1}.
GATES = {
    "AND": lambda b: b.all(1),
    "OR": lambda b: b.any(1),
    "XOR": lambda b: b.sum(1) % 2,
    "NAND": lambda b: ~b.all(1),
    "NOR": lambda b: ~b.any(1),
    "XNOR": lambda b: 1 - b.sum(1) % 2,
    "MAJ": lambda b: 2 * b.sum(1) > b.shape[1],
    "PARITY": lambda b: b.sum(1) % 2,
}


@dataclass(frozen=True)
class Gate:
    op: str  # a key of GATES
    inputs: tuple[int, ...]  # indices into the previous layer (layer 0 reads the input bits)


@dataclass(frozen=True)
class Circuit:
    n_inputs: int
    layers: tuple[tuple[Gate, ...], ...]
    outputs: tuple[int, ...]  # indices into the last layer, in output order

    @property
    def modularity(self) -> list[int]:
        """Layer widths `[n, m1, ..., out]`, as the original's `--modularity`."""
        return [self.n_inputs, *(len(layer) for layer in self.layers), len(self.outputs)]

    @property
    def arity(self) -> int:
        arities = {len(g.inputs) for layer in self.layers for g in layer}
        if len(arities) != 1:
            raise ValueError(f"circuit mixes gate arities {sorted(arities)}")
        return arities.pop()

    @property
    def routing(self) -> list[list[list[int]]]:
        """Per layer, the input indices of each module (ground-truth input routing)."""
        return [[list(g.inputs) for g in layer] for layer in self.layers]

    @property
    def library(self) -> list[str]:
        """Distinct gate types, in order of first appearance: the shared-module library."""
        return list(dict.fromkeys(g.op for layer in self.layers for g in layer))

    @property
    def slots(self) -> list[list[int]]:
        """Per layer, the library module each slot uses (ground-truth module locations)."""
        index = {op: i for i, op in enumerate(self.library)}
        return [[index[g.op] for g in layer] for layer in self.layers]

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Outputs [rows, n_out] (uint8) of inputs x [rows, n_inputs] (0/1)."""
        h = np.asarray(x, dtype=np.uint8)
        for layer in self.layers:
            h = np.stack([GATES[g.op](h[:, list(g.inputs)]) for g in layer], 1).astype(np.uint8)
        return h[:, list(self.outputs)]

    def truth_table(self) -> tuple[np.ndarray, np.ndarray]:
        """All 2^n inputs in `itertools.product([0, 1], repeat=n)` order, and their outputs."""
        x = np.array(list(itertools.product([0, 1], repeat=self.n_inputs)), dtype=np.uint8)
        return x, self.evaluate(x)


def circuit(n_inputs: int, *layers: list[tuple[str, tuple[int, ...]]], outputs=None) -> Circuit:
    """Build a Circuit from `(op, inputs)` pairs per layer; outputs default to the whole last layer."""
    built = tuple(tuple(Gate(op, tuple(ins)) for op, ins in layer) for layer in layers)
    for op in {g.op for layer in built for g in layer}:
        if op not in GATES:
            raise ValueError(f"unknown gate {op!r}; known: {sorted(GATES)}")
    return Circuit(n_inputs, built, tuple(outputs if outputs is not None else range(len(built[-1]))))


_XORS = [("XOR", (0, 1)), ("XOR", (2, 3)), ("XOR", (4, 5))]

# The Boolean tasks of SPEC §1, keyed by modularity.
PRESETS: dict[tuple[int, ...], Circuit] = {
    (6, 2, 2): circuit(6, _XORS[:2]),
    (6, 3, 2, 2): circuit(6, _XORS, [("AND", (0, 1)), ("AND", (1, 2))]),
    (6, 3, 3, 2, 2): circuit(
        6,
        _XORS,
        [("AND", (0, 1)), ("AND", (1, 2)), ("AND", (0, 2))],
        [("OR", (0, 2)), ("OR", (1, 2))],
    ),
}
