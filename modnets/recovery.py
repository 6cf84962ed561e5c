"""Structure recovery: does a trained modular network find the task's circuit?

Three metrics per replicate, each averaged over the task's circuits (sub-tasks), all in [0, 1]:

- `input_routing`: fraction of the circuit's modules whose selected inputs equal the true ones
  (as sets). Modules of a layer are interchangeable, so learned modules are matched to true ones
  layer by layer with the Hungarian algorithm (most exact matches, then most shared inputs), and
  the next layer's inputs are read through that matching. `output_routing`: fraction of output
  bits read from the right (matched) module.
- `slot_assignment` (shared models): fraction of slots whose library module is the true gate's,
  up to a relabelling of the library (again a Hungarian matching, over all slots).
- `specialisation`: fraction of the circuit's modules whose matched learned module computes the
  true gate on {0,1}^k: its outputs on the 2^k binary inputs separate the rows where the gate is 1
  from those where it is 0 (any threshold, either polarity: a hidden module feeds the next one
  unscaled, so XOR and XNOR, AND and NAND are the same feature). The gates are symmetric, so the
  order of a module's inputs does not matter.

- `exact_structure`: 1.0 when every true module's input set and every output pick equal the
  circuit's up to relabelling of modules (input_routing and output_routing both 1), else 0.0
  (the mean over a task set's circuits: the fraction of tasks recovered exactly).
- `sub_functions`: fraction of the circuit's intermediate functions (every gate of every layer)
  that some module of the model (any layer) computes on the task's rows, up to negation: its
  output on those rows separates the rows where the gate is 1 from those where it is 0.

Baselines: `random` holds the expected value of each metric for uniformly random routers (Monte
Carlo through the same matching) and for modules whose 2^k outputs are in random order (exact);
`init` (added by the trainer) is the untrained model.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

from modnets.circuits import GATES, Circuit

if TYPE_CHECKING:  # torch is imported where a model is measured: the W&B worker draws pictures without it
    import torch


@functools.cache
def binary_rows(k: int) -> np.ndarray:
    """All 2^k inputs of a k-input module, in `itertools.product` order: [2^k, k]."""
    return ((np.arange(2**k)[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8)


@functools.cache  # read-only use: recovery asks for the same few tables thousands of times
def gate_table(op: str, k: int) -> np.ndarray:
    return np.asarray(GATES[op](binary_rows(k)), dtype=np.uint8) & 1


def separates(outputs: np.ndarray, bits: np.ndarray) -> bool:
    """True when some threshold splits `outputs` [2^k] into exactly the rows where `bits` is 1 (or 0)."""
    return bool(separates_all(outputs, bits))


def separates_all(outputs: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """`separates` of many output rows [..., 2^k] at once."""
    ones, zeros = outputs[..., bits == 1], outputs[..., bits == 0]
    if ones.shape[-1] == 0 or zeros.shape[-1] == 0:
        return np.ones(outputs.shape[:-1], bool)
    return (ones.min(-1) > zeros.max(-1)) | (ones.max(-1) < zeros.min(-1))


def assign(cost: np.ndarray, maximize: bool = False) -> np.ndarray:
    """Exact linear sum assignment of every matrix of a stack at once: cost [B, rows, cols] ->
    [B, rows], the column of each row (-1: none, when rows outnumber columns).

    The shortest augmenting path algorithm (Crouse 2016, "On implementing 2D rectangular
    assignment algorithms", IEEE TAES 52(4)) exactly as `scipy.optimize.linear_sum_assignment`
    runs it (same transposition, same order of rows and columns, same float operations), in
    lockstep over the stack: the same assignment as scipy for every matrix, ties included, with
    numpy operations over all matrices instead of one call per matrix (recovery solves one small
    matrix per replicate, circuit and layer)."""
    c = np.asarray(cost, dtype=np.float64)
    B, rows, cols = c.shape
    out = np.full((B, rows), -1, dtype=np.int64)
    if B == 0 or rows == 0 or cols == 0:
        return out
    transpose = cols < rows  # as scipy: a tall matrix is solved transposed
    if transpose:
        c = c.transpose(0, 2, 1)
    c = np.ascontiguousarray(-c if maximize else c)
    if np.isnan(c).any() or (c == -np.inf).any():
        raise ValueError("assignment: the cost matrix holds NaN or -inf (maximize: +inf)")
    col4row = _solve(c)
    if not transpose:
        return col4row
    out[np.arange(B)[:, None], col4row] = np.arange(c.shape[1])
    return out


def _solve(c: np.ndarray) -> np.ndarray:
    """col4row [B, rows] of cost matrices c [B, rows, cols], rows <= cols: one augmenting path per row."""
    B, nr, nc = c.shape
    u, v = np.zeros((B, nr)), np.zeros((B, nc))
    col4row, row4col = np.full((B, nr), -1, np.int64), np.full((B, nc), -1, np.int64)
    path = np.full((B, nc), -1, np.int64)
    every = np.arange(B)
    for cur in range(nr):
        min_val, sink, spc, SR, SC = _shortest_paths(c, u=u, v=v, path=path, row4col=row4col, cur=cur)
        u[:, cur] += min_val  # the dual variables
        others = SR.copy()
        others[:, cur] = False
        seen = np.take_along_axis(spc, np.where(others, col4row, 0), 1)
        u = np.where(others, u + (min_val[:, None] - seen), u)
        with np.errstate(invalid="ignore"):
            v = np.where(SC, v - (min_val[:, None] - spc), v)
        j, active = sink, every  # augment along the path back to row `cur`
        while active.size:
            i = path[active, j]
            row4col[active, j] = i
            j, col4row[active, i] = col4row[active, i], j
            keep = i != cur
            active, j = active[keep], j[keep]
    return col4row


def _shortest_paths(c, u, v, path, row4col, cur: int):
    """scipy's `augmenting_path` from row `cur`, for every matrix at once. Every matrix still
    searching is at the same step, so its `remaining` columns are equally many (nc - step)."""
    B, nr, nc = c.shape
    min_val, sink, i = np.zeros(B), np.full(B, -1), np.full(B, cur)
    remaining = np.tile(np.arange(nc - 1, -1, -1), (B, 1))  # reverse order, as scipy
    SR, SC = np.zeros((B, nr), bool), np.zeros((B, nc), bool)
    spc = np.full((B, nc), np.inf)  # shortest path costs
    for step in range(nc):
        a = np.flatnonzero(sink < 0)
        if a.size == 0:
            break
        n, ia, col = nc - step, i[a], a[:, None]
        SR[a, ia] = True
        rem = remaining[a, :n]
        r = min_val[a, None] + np.take_along_axis(c[a, ia], rem, 1) - u[a, ia][:, None] - v[col, rem]
        old = spc[col, rem]
        better = r < old
        path[col, rem] = np.where(better, ia[:, None], path[col, rem])
        new = np.where(better, r, old)
        spc[col, rem] = new
        lowest = new.min(1)
        if np.isinf(lowest).any():
            raise ValueError("assignment: the cost matrix is infeasible")
        # scipy scans the remaining columns in order: the first at the lowest cost, unless a later
        # (or that) one at the lowest cost is a free column (a sink): then the last such one
        at_low = new == lowest[:, None]
        sinks = at_low & (row4col[col, rem] < 0)
        index = np.where(sinks.any(1), n - 1 - sinks[:, ::-1].argmax(1), at_low.argmax(1))
        j = rem[np.arange(a.size), index]
        min_val[a] = lowest
        owner = row4col[a, j]
        free = owner < 0
        sink[a[free]] = j[free]
        i[a[~free]] = owner[~free]
        SC[a, j] = True
        remaining[a, index] = remaining[a, n - 1]
    return min_val, sink, spc, SR, SC


def match_layers(learned: list[list[list[int]]], truth: list[list[list[int]]]):
    """Match learned modules to true ones, layer by layer (one replicate: `match_all`)."""
    perms, fractions = match_all([np.asarray(ins, dtype=np.int64)[None] for ins in learned], truth)
    return [p[0] for p in perms], [float(f[0]) for f in fractions]


def match_all(learned: list[np.ndarray], truth: list[list[list[int]]]):
    """Match learned modules to true ones, layer by layer, for a batch of B replicates.

    learned[i]: [B, modules, k], the inputs of each module of layer i, indices into the previous
    layer (layer 0 reads the input bits); truth[i][t]: the inputs of true module t. Returns per
    layer the matching `perm` [B, modules] (learned module -> true module, -1 if unmatched) and
    the fraction of true modules recovered [B]. The matching maximises the number of learned
    modules whose input set equals their true module's, then the inputs they share, then keeps
    modules in place (`assign`); the next layer's inputs are read through it.
    """
    prev = None
    perms, fractions = [], []
    for ins, true in zip(learned, truth):
        B, n, k = ins.shape
        mapped = ins if prev is None else np.take_along_axis(prev, ins.reshape(B, n * k), 1).reshape(B, n, k)
        width = 2 + max(int(mapped.max(initial=0)), max((a for t in true for a in t), default=0))
        hot = np.zeros((B, n, width), bool)  # input sets as 0/1 rows (column 0: an unmatched module, -1)
        np.put_along_axis(hot, mapped.reshape(B, n, k) + 1, True, 2)
        true_hot = np.zeros((len(true), width), bool)
        for t, s in enumerate(true):
            true_hot[t, np.asarray(s, dtype=np.int64) + 1] = True
        equal = (hot[:, :, None] == true_hot[None, None]).all(3)  # [B, n, m]
        shared = (hot[:, :, None] & true_hot[None, None]).sum(3)
        in_place = np.arange(n)[:, None] == np.arange(len(true))[None, :]
        perm = assign(equal + 1e-2 * shared + 1e-6 * in_place, maximize=True)
        hit = (perm >= 0) & np.take_along_axis(equal, np.maximum(perm, 0)[:, :, None], 2)[:, :, 0]
        fractions.append(hit.sum(1) / len(true))
        perms.append(perm)
        prev = perm
    return perms, fractions


def recover(routing: dict, circuits: list[Circuit], tables=None, skip_output: bool = False) -> dict:
    """Recovery metrics of one replicate.

    routing: `inputs[layer][task][module]`, `outputs[task]` and, for shared models,
    `locations[layer][task][slot]` (as in results.json). tables: the outputs of the trained
    modules on {0,1}^k, per layer [modules, 2^k] (one library [library, 2^k] for shared models),
    or None to skip `specialisation`.
    """
    batch = None if tables is None else [np.asarray(t)[None] for t in tables]
    return recover_all([routing], circuits, tables=batch, skip_output=skip_output)[0]


def recover_all(routings: list[dict], circuits: list[Circuit], tables=None, skip_output: bool = False) -> list[dict]:
    """`recover` of B replicates at once (the same numbers, computed with numpy over the batch).

    routings: B routings of one model (the modules of a layer read equally many inputs); tables:
    None or per layer (one library) the module outputs of every replicate, [B, modules, 2^k].
    """
    B = len(routings)
    per_layer = lambda key: [np.asarray([r[key][i] for r in routings], np.int64) for i in range(len(routings[0][key]))]  # noqa: E731
    inputs = per_layer("inputs")  # [B, tasks, modules, k] per layer
    outputs = np.asarray([r["outputs"] for r in routings], dtype=np.int64)  # [B, tasks, picks]
    shared = "locations" in routings[0]
    locations = per_layer("locations") if shared else None  # [B, tasks, slots] per layer
    library = list(dict.fromkeys(op for c in circuits for op in c.library))
    n_modules = sum(len(layer) for c in circuits for layer in c.layers)
    exact, routing_frac, out_frac, layer_fracs = [], [], [], []
    slots = np.zeros((B, 1 + max((int(x.max(initial=0)) for x in locations or []), default=0), len(library)))
    spec = np.zeros(B, np.int64)
    for t, c in enumerate(circuits):
        perms, fractions = match_all([layer[:, t] for layer in inputs], c.routing)
        n_true = [len(layer) for layer in c.layers]
        layer_fracs.append(fractions)
        total = 0
        for f, n in zip(fractions, n_true):  # summed in order, as Python's sum
            total = total + f * n
        routing_frac.append(total / sum(n_true))
        hits = output_hits(outputs[:, t], true_outputs=c.outputs, perms=perms, true_widths=n_true, skip_output=skip_output)
        out_frac.append(hits / len(c.outputs))
        exact.append(np.logical_and.reduce([f == 1 for f in fractions] + [out_frac[-1] == 1]).astype(float))
        for i, (perm, layer) in enumerate(zip(perms, c.layers)):
            matched, true = perm >= 0, np.maximum(perm, 0)
            module = locations[i][:, t] if shared else np.broadcast_to(np.arange(perm.shape[1]), perm.shape)
            if shared:
                gate = np.asarray([library.index(g.op) for g in layer])[true]
                np.add.at(slots, (np.nonzero(matched)[0], module[matched], gate[matched]), 1)
            if tables is not None:
                rows = np.take_along_axis(tables[0] if shared else tables[i], module[:, :, None], 1)  # [B, n, 2^k]
                separated = np.stack([separates_all(rows, gate_table(g.op, len(g.inputs))) for g in layer], 2)
                spec += (matched & np.take_along_axis(separated, true[:, :, None], 2)[:, :, 0]).sum(1)
    columns = {
        "exact_structure": np.mean(np.stack(exact, 1), 1),
        "input_routing": np.mean(np.stack(routing_frac, 1), 1),
        "output_routing": np.mean(np.stack(out_frac, 1), 1),
    }
    if shared:
        best = assign(slots, maximize=True)
        taken = np.take_along_axis(slots, np.maximum(best, 0)[:, :, None], 2)[:, :, 0]
        columns["slot_assignment"] = np.where(best >= 0, taken, 0).sum(1) / n_modules
    if tables is not None:
        columns["specialisation"] = spec / n_modules
    return per_replicate(columns, layer_fracs)


def per_replicate(columns: dict[str, np.ndarray], layer_fracs: list[list[np.ndarray]]) -> list[dict]:
    """One dict of Python floats per replicate from metric columns [B] and, per circuit and layer, the
    fractions [B] (`input_routing_layers`: their mean over circuits; None when circuits differ in depth)."""
    values = {k: v.tolist() for k, v in columns.items()}
    B = len(layer_fracs[0][0])
    same_depth = len({len(f) for f in layer_fracs}) == 1
    layers = np.mean(np.stack([np.stack(f, 1) for f in layer_fracs], 1), 1).tolist() if same_depth else [None] * B
    keys = ["exact_structure", "input_routing", "input_routing_layers", "output_routing", *list(columns)[3:]]
    values["input_routing_layers"] = layers
    return [dict(zip(keys, v)) for v in zip(*(values[k] for k in keys))]


def output_hits(outputs: np.ndarray, true_outputs, perms, true_widths, skip_output: bool) -> np.ndarray:
    """How many output bits [B] are read from the matched true module (last layer, or all layers with skip_output)."""
    if skip_output:
        true_off = np.cumsum([0, *true_widths[:-1]])
        to_truth = np.concatenate([np.where(p >= 0, p + true_off[i], -1) for i, p in enumerate(perms)], 1)
        true_outputs = [int(true_off[-1]) + o for o in true_outputs]
    else:
        to_truth = perms[-1]
    n = min(outputs.shape[1], len(true_outputs))
    return (np.take_along_axis(to_truth, outputs[:, :n], 1) == np.asarray(true_outputs[:n])).sum(1)


def bank_tables(model) -> list[np.ndarray]:
    """Per layer (one entry for a shared library): every replicate's modules' outputs on {0,1}^k, [R, n, 2^k]."""
    import torch

    k = int(model.routers[0].k)
    banks = [model.bank] if model.shared else list(model.banks)
    per_bank = []
    with torch.no_grad():
        for bank in banks:
            R, n = bank.weights[0].shape[:2]
            x = torch.from_numpy(binary_rows(k)).float().to(bank.weights[0].device)
            x = x[None, :, None, :].expand(R, -1, n, -1)
            per_bank.append(bank(x).squeeze(-1).transpose(1, 2).cpu().numpy())  # [R, n, 2^k]
    return per_bank


def applicable(model, task) -> bool:
    """Recovery is defined for routed modular models (`ModularNet`) on tasks with known circuits."""
    circuits = getattr(task, "circuits", None)
    if not circuits or not hasattr(model, "routers") or not (hasattr(model, "banks") or hasattr(model, "bank")):
        return False
    try:
        arity = {c.arity for c in circuits}
    except ValueError:
        return False
    return (
        len(arity) == 1
        and arity.pop() == int(model.routers[0].k)
        and all(len(c.layers) == len(model.routers) for c in circuits)
        and model.routers[0].width == circuits[0].n_inputs
    )


def measure(model, task) -> list[dict] | None:
    """Recovery metrics of every replicate of `model` (None when not applicable)."""
    if not applicable(model, task):
        return None
    skip = bool(getattr(model, "skip_output", False))
    measured = recover_all(model.routing_summary(), task.circuits, tables=bank_tables(model), skip_output=skip)
    return [m | {"sub_functions": f} for m, f in zip(measured, sub_functions(model, task))]


def gate_values(circuit: Circuit, x: np.ndarray) -> np.ndarray:
    """Every gate's value [rows, gates] (layer by layer) on inputs x [rows, n_inputs] (0/1)."""
    h, values = np.asarray(x, dtype=np.uint8), []
    for layer in circuit.layers:
        h = np.stack([GATES[g.op](h[:, list(g.inputs)]) for g in layer], 1).astype(np.uint8) & 1
        values.append(h)
    return np.concatenate(values, 1)


def sub_functions(model, task) -> list[float]:
    """Per replicate, the mean over circuits of the fraction of its gates that some module computes
    (up to negation) on the rows of the circuit's task, with the hard (evaluation) routing."""
    import torch

    R = model.routers[0].logits.shape[0]
    was = model.training
    model.eval()
    with torch.no_grad():
        outputs = torch.cat(model.layers(task.x.expand(R, *task.x.shape), task.task_id.expand(R, -1)), 2)  # [R, rows, M]
    model.train(was)
    per_circuit = []
    for t, c in enumerate(task.circuits):
        rows = (task.task_id == t).nonzero().flatten()
        truth = gate_values(c, task.x[rows].round().cpu().numpy()).astype(bool)  # [rows, G]
        o = outputs[:, rows]  # [R, rows, M]
        found = []
        for bits in truth.T:  # per gate: is some module's output on its 1-rows all above (or below) its 0-rows?
            lo1, hi1 = extremes(o, np.flatnonzero(bits))  # [R, M]
            lo0, hi0 = extremes(o, np.flatnonzero(~bits))
            found.append(((lo1 > hi0) | (hi1 < lo0)).any(1))  # [R]: constant gates count as found
        per_circuit.append(torch.stack(found, 1).float().mean(1))
    return torch.stack(per_circuit).mean(0).cpu().tolist()


def extremes(outputs: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the given rows of outputs [R, rows, M]: [R, M] each (no rows: inf and -inf)."""
    import torch

    if len(rows) == 0:
        inf = torch.full(outputs[:, 0].shape, float("inf"), device=outputs.device)
        return inf, -inf
    return torch.aminmax(outputs[:, torch.from_numpy(rows).to(outputs.device)], dim=1)


def describe(model, task) -> dict:
    """The shape of a model's routing, the key of its random baseline."""
    widths = [int(r.consumers) for r in model.routers]
    library = int(model.bank.weights[0].shape[1]) if model.shared else 0
    return {
        "widths": tuple(widths),
        "k": int(model.routers[0].k),
        "library": library,
        "skip_output": bool(getattr(model, "skip_output", False)),
    }


def random_baseline(
    circuits: list[Circuit], widths, k: int, library: int = 0, skip_output: bool = False, draws: int = 1000, seed: int = 0
) -> dict:
    """Expected recovery under uniformly random routers (Monte Carlo, `draws` seeded draws) and,
    for `specialisation`, under modules whose 2^k outputs come in random order (exact)."""
    return dict(_random_baseline(tuple(circuits), tuple(widths), k, library, skip_output, draws, seed))


@functools.lru_cache(maxsize=64)
def _random_baseline(circuits, widths, k, library, skip_output, draws, seed):
    rng = np.random.default_rng(seed)
    n_in, T = circuits[0].n_inputs, len(circuits)
    reads = [n_in, *widths[:-1]]
    n_out = len(circuits[0].outputs)
    out_width = sum(widths) if skip_output else widths[-1]
    routings = []
    for _ in range(draws):
        routing = {
            "inputs": [[[rng.permutation(w)[:k] for _ in range(n)] for _ in range(T)] for w, n in zip(reads, widths)],
            "outputs": [rng.permutation(out_width)[:n_out] for _ in range(T)],
        }
        if library:
            routing["locations"] = [[rng.integers(0, library, n) for _ in range(T)] for n in widths]
        routings.append(routing)
    totals: dict[str, float] = {}
    for measured in recover_all(routings, list(circuits), skip_output=skip_output):  # summed in draw order
        for key, value in measured.items():
            if key != "input_routing_layers":
                totals[key] = totals.get(key, 0.0) + value / draws
    chance = [separation_chance(gate_table(g.op, k)) for c in circuits for layer in c.layers for g in layer]
    totals["specialisation"] = float(np.mean(chance))
    return totals


def separation_chance(bits: np.ndarray) -> float:
    """Probability that a module with exchangeable random outputs separates this truth table."""
    ones, m = int(bits.sum()), len(bits)
    if ones in (0, m):
        return 1.0
    return 2 / math.comb(m, ones)


def with_baselines(model, task, measured: list[dict] | None, init: list[dict] | None) -> list[dict] | None:
    """Attach the random-router baseline and the untrained model's values to each replicate's metrics."""
    if measured is None:
        return None
    d = describe(model, task)
    n_modules = sum(len(layer) for c in task.circuits for layer in c.layers)
    draws = max(100, min(1000, 10000 // n_modules))  # 1000 up to 10 modules, fewer (cheaper) for large circuits
    base = random_baseline(task.circuits, d["widths"], d["k"], d["library"], d["skip_output"], draws=draws)
    return [
        {**m, "random": base, **({"init": i} if i is not None else {})} for m, i in zip(measured, init or [None] * len(measured))
    ]
