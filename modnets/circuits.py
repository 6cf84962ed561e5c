"""Boolean circuits: layers of gate modules with known wiring (spec §1).

A circuit is the ground truth a modular network can try to recover: its truth
table is the dataset, its wiring is the "known routing", and the gate type of
each slot says which module of a shared library the slot should use.
"""

from __future__ import annotations

import itertools
import re
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

# The Boolean tasks of spec §1, keyed by modularity.
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


# Three tasks over the same 6 inputs with gates from {XOR, OR, AND} (spec §1, multi-task set).
# Task 2 reads four distinct first-layer functions, so its circuit has four first-layer gates:
# a set containing it has the joint layer widths [6, 4, 2, 2] (see `joint_modularity`).
MULTITASK: list[Circuit] = [
    PRESETS[(6, 3, 2, 2)],
    circuit(6, [("OR", (0, 2)), ("OR", (3, 4)), ("OR", (1, 5))], [("AND", (0, 1)), ("AND", (1, 2))]),
    circuit(
        6,
        [("OR", (0, 2)), ("XOR", (4, 5)), ("XOR", (0, 1)), ("OR", (3, 4))],
        [("AND", (0, 1)), ("AND", (2, 3))],
    ),
]


def joint_modularity(circuits: list[Circuit]) -> list[int]:
    """Layer widths that hold every circuit of a multi-task set: the widest of each layer.
    A circuit narrower than the joint width simply leaves the extra modules of its task unused."""
    shapes = [c.modularity for c in circuits]
    ends = {(s[0], len(s), s[-1]) for s in shapes}
    if len(ends) != 1:
        raise ValueError(f"circuits of one task set need equal inputs, depth and outputs; got {shapes}")
    return [max(col) for col in zip(*shapes)]


def joint_library(circuits: list[Circuit]) -> tuple[list[str], list[list[list[int]]]]:
    """The gate types of all circuits in order of first appearance (the shared library of a task
    set), and each circuit's slots as indices into it (for one circuit: `c.library`, `c.slots`)."""
    library = list(dict.fromkeys(op for c in circuits for op in c.library))
    index = {op: i for i, op in enumerate(library)}
    return library, [[[index[g.op] for g in layer] for layer in c.layers] for c in circuits]


# k-ary gates for the generator: TH{t} = at least t inputs on (TH1 = OR, TH{k} = AND, MAJ = TH{k//2+1});
# PARITY is XOR of k inputs (an alias kept for the original's naming).
for _t in range(1, 33):
    GATES[f"TH{_t}"] = lambda b, t=_t: b.sum(1) >= t
BASIC_GATES = ["AND", "OR", "XOR", "NAND", "NOR", "XNOR"]


def default_gates(k: int) -> list[str]:
    """The generator's default library: the six basic gates, plus majority and the thresholds
    that differ from OR, AND and majority when k > 2."""
    if k <= 2:
        return list(BASIC_GATES)
    return [*BASIC_GATES, "MAJ", *(f"TH{t}" for t in range(2, k) if t != k // 2 + 1)]


def default_widths(n_inputs: int, depth: int, n_outputs: int, k: int) -> list[int]:
    """Module layer widths for a depth: the last layer is the outputs, each earlier layer at most
    k times wider than the next (so every module can be read), capped at ceil(n_inputs / k)."""
    cap = -(-n_inputs // k)
    return [min(k ** (depth - 1 - i) * n_outputs, max(cap, n_outputs)) for i in range(depth)]


def layer_outputs(c: Circuit, x: np.ndarray, flip: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every layer's outputs [rows, width]; `flip=(layer, module)` inverts one module's output."""
    h, out = np.asarray(x, dtype=np.uint8), []
    for i, layer in enumerate(c.layers):
        h = np.stack([GATES[g.op](h[:, list(g.inputs)]) for g in layer], 1).astype(np.uint8)
        if flip is not None and flip[0] == i:
            h[:, flip[1]] ^= 1
        out.append(h)
    return out


def check_rows(n_inputs: int, rng: np.random.Generator, max_rows: int = 4096) -> np.ndarray:
    """All inputs when there are at most `max_rows`, else `max_rows` random ones."""
    if 2**n_inputs <= max_rows:
        return bits(np.arange(2**n_inputs), n_inputs)
    return rng.integers(0, 2, size=(max_rows, n_inputs), dtype=np.uint8)


def bits(rows: np.ndarray, n: int) -> np.ndarray:
    """Row numbers -> their n bits, most significant first (the `itertools.product` order)."""
    return ((np.asarray(rows)[:, None] >> np.arange(n - 1, -1, -1)) & 1).astype(np.uint8)


def is_well_formed(c: Circuit, x: np.ndarray) -> bool:
    """On the rows x: no module is constant, and inverting any module's output changes some
    output (every module is used by an output, not only wired to one)."""
    base = layer_outputs(c, x)
    if any((h.min(0) == h.max(0)).any() for h in base):
        return False
    outputs = base[-1][:, list(c.outputs)]
    for i, layer in enumerate(c.layers):
        for j in range(len(layer)):
            if np.array_equal(layer_outputs(c, x, (i, j))[-1][:, list(c.outputs)], outputs):
                return False
    return True


MIN_MINORITY = 1 / 32  # the generator's floor on how often a module's rarer output value occurs


def random_circuit(
    n_inputs: int,
    widths: list[int],
    k: int = 2,
    gates: list[str] | None = None,
    seed: int = 0,
    tries: int = 200,
) -> Circuit:
    """A random layered circuit of k-input gates; its outputs are the whole last layer.

    Guarantees: every module is read by the next layer (every module is reachable from an
    output), every input bit is read when the first layer has room (`widths[0] * k >= n_inputs`),
    the k inputs of a module are distinct, no two modules of a layer compute the same function
    (on the rows checked; no two outputs one function or its negation), no module and no output
    is constant, and inverting any module changes some output. Functional checks run on the
    whole truth table up to 12 inputs and on 4096 random rows beyond (passing them on a sample
    proves non-constancy). Each module's gate is drawn
    from the library among those whose rarer output value occurs on at least 1/32 of those
    rows, so that deep circuits do not collapse into near-constant outputs. Deterministic in
    `seed`; the library is `gates` (default: `default_gates(k)`).
    """
    from modnets.config import ConfigError, check

    widths = [int(w) for w in widths]
    gates = list(gates) if gates is not None else default_gates(k)
    check(k >= 1, "task.arity", k, "a gate arity >= 1")
    check(n_inputs >= k, "task.n_inputs", n_inputs, f"at least the gate arity {k}")
    check(len(widths) > 0 and min(widths) > 0, "task.widths", widths, "positive module counts per layer")
    check(len(gates) > 0, "task.gates", gates, "a non-empty gate library")
    for name in gates:
        check(name in GATES, "task.gates", gates, f"gate names from {BASIC_GATES + ['MAJ', 'PARITY']} or TH<t>")
        t = int(name[2:]) if name.startswith("TH") else 0
        check(t <= k, "task.gates", gates, f"thresholds TH<t> with t <= the arity {k}")
        check(k > 2 or name not in ("MAJ", "PARITY") and not t, "task.gates", gates, "MAJ, PARITY, TH<t> only for arity > 2")
    for i, (w, reader) in enumerate(zip([n_inputs, *widths[:-1]], widths)):
        check(w >= k, "task.widths", widths, f"layers of at least {k} modules (layer {i + 1} reads {k} of them)")
        check(i == 0 or w <= k * reader, "task.widths", widths, f"each layer at most {k} times wider than the next")
    rng = np.random.default_rng(seed)
    x = check_rows(n_inputs, rng)
    for _ in range(tries):
        layers, h = [], x
        for i, n in enumerate(widths):
            layer = random_layer(rng, h, n, k, gates, outputs=i == len(widths) - 1)
            if layer is None:
                break
            layers.append(layer)
            h = np.stack([GATES[g.op](h[:, list(g.inputs)]) for g in layer], 1).astype(np.uint8)
        else:
            c = Circuit(n_inputs, tuple(layers), tuple(range(widths[-1])))
            if is_well_formed(c, x):
                return c
    allowed = f"a seed with a well-formed circuit (none in {tries} draws for {widths}, {gates})"
    raise ConfigError("task.circuit_seed", seed, allowed)


def random_layer(
    rng: np.random.Generator, h: np.ndarray, n: int, k: int, gates: list[str], outputs: bool = False
) -> tuple[Gate, ...] | None:
    """n gates reading k distinct of the units h [rows, width] each, covering every unit when
    n * k >= width; each gate drawn at random among those whose output on h is not near-constant
    and differs from every earlier module's of the layer (`outputs`, the last layer: and from its
    negation); None when a module has no such gate. Outputs, not gate names, are compared:
    different gates on dependent units (or MAJ and TH2 on three inputs) can compute one function,
    which made the two outputs of some circuits one function or its negation."""
    width = h.shape[1]
    deal = list(rng.permutation(width))
    layer, seen = [], set()
    for _ in range(n):
        ins, deal = deal[:k], deal[k:]
        rest = [u for u in rng.permutation(width) if u not in ins]
        ins = tuple(sorted(int(u) for u in [*ins, *rest[: k - len(ins)]]))
        for op in rng.permutation(gates):
            out = np.asarray(GATES[op](h[:, list(ins)]), dtype=np.uint8) & 1
            p = out.mean()
            if out.tobytes() not in seen and min(p, 1 - p) >= MIN_MINORITY:
                break
        else:
            return None
        seen |= {out.tobytes(), (1 - out).tobytes()} if outputs else {out.tobytes()}
        layer.append(Gate(str(op), ins))
    return tuple(layer)


GATE_SYNTAX = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)\s*\(\s*(\d+(?:\s*,\s*\d+)*)\s*\)\s*$")
GATE_NAMES = "AND, OR, XOR, NAND, NOR, XNOR, MAJ, PARITY or TH<t> (at least t inputs on)"


def parse_gate(text, key: str, width: int) -> Gate:
    """A gate written `GATE(i,j,...)` over the `width` outputs of the layer below (ConfigError naming `key`)."""
    from modnets.config import ConfigError, check

    match = GATE_SYNTAX.match(str(text))
    if match is None:
        raise ConfigError(key, text, 'a gate written GATE(i,j,...), e.g. "XOR(0,1)" (quote gates in YAML flow lists)')
    op, inputs = match.group(1).upper(), tuple(int(i) for i in match.group(2).split(","))
    check(op in GATES, key, text, f"a gate of the library: {GATE_NAMES}")
    check(max(inputs) < width, key, text, f"input indices below {width}, the width of the layer it reads")
    check(len(set(inputs)) == len(inputs), key, text, "distinct input indices")
    check(not op.startswith("TH") or int(op[2:]) <= len(inputs), key, text, f"a threshold TH<t> with t <= {len(inputs)} inputs")
    return Gate(op, inputs)


def circuit_from_spec(n_inputs: int, layers: list, outputs: list | None = None, key: str = "task") -> Circuit:
    """A Circuit from its config (`task=circuit`): `layers` lists, per layer, gates `"GATE(i,j,...)"`
    over the previous layer's outputs (layer 0 reads the input bits); `outputs` picks last-layer
    modules (default: all). Every module must be read by the next layer or be an output, and all
    gates share one arity (the modules of a network have one input count). Errors name the key."""
    from modnets.config import ConfigError, check

    check(isinstance(n_inputs, int) and n_inputs >= 1, f"{key}.n_inputs", n_inputs, "a number of input bits >= 1")
    check(isinstance(layers, list) and len(layers) > 0, f"{key}.layers", layers, "a non-empty list of layers of gates")
    built, width = [], n_inputs
    for i, layer in enumerate(layers):
        allowed = 'a non-empty list of gates "GATE(i,j,...)"'
        check(isinstance(layer, list) and len(layer) > 0, f"{key}.layers[{i}]", layer, allowed)
        built.append(tuple(parse_gate(g, f"{key}.layers[{i}][{j}]", width) for j, g in enumerate(layer)))
        width = len(layer)
    outputs = list(range(width)) if outputs is None else outputs
    ok = isinstance(outputs, list) and len(outputs) > 0 and all(isinstance(o, int) and 0 <= o < width for o in outputs)
    check(ok, f"{key}.outputs", outputs, f"null or a non-empty list of last-layer module indices below {width}")
    for i, layer in enumerate(built):
        read = set(outputs) if i == len(built) - 1 else {u for g in built[i + 1] for u in g.inputs}
        for j in range(len(layer)):
            if j not in read:
                reader = "an output (task.outputs)" if i == len(built) - 1 else f"an input of layer {i + 1}"
                allowed = f"a module that is used: make it {reader} or remove it"
                raise ConfigError(f"{key}.layers[{i}][{j}]", layers[i][j], allowed)
    arities = sorted({len(g.inputs) for layer in built for g in layer})
    check(len(arities) == 1, f"{key}.layers", layers, f"gates of one arity (got {arities}; set router.topk to it)")
    return Circuit(int(n_inputs), tuple(built), tuple(int(o) for o in outputs))
