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

import numpy as np
import torch

from modnets.circuits import GATES, Circuit


@functools.cache
def binary_rows(k: int) -> np.ndarray:
    """All 2^k inputs of a k-input module, in `itertools.product` order: [2^k, k]."""
    return ((np.arange(2**k)[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8)


@functools.cache  # read-only use: recovery asks for the same few tables thousands of times
def gate_table(op: str, k: int) -> np.ndarray:
    return np.asarray(GATES[op](binary_rows(k)), dtype=np.uint8) & 1


def separates(outputs: np.ndarray, bits: np.ndarray) -> bool:
    """True when some threshold splits `outputs` [2^k] into exactly the rows where `bits` is 1 (or 0)."""
    ones, zeros = outputs[bits == 1], outputs[bits == 0]
    if len(ones) == 0 or len(zeros) == 0:
        return True
    return bool(ones.min() > zeros.max() or ones.max() < zeros.min())


def match_layers(learned: list[list[list[int]]], truth: list[list[list[int]]]):
    """Match learned modules to true ones, layer by layer.

    learned[i][j], truth[i][t]: the inputs of module j (t) of layer i, indices into the previous
    layer (layer 0 reads the input bits). Returns per layer the matching `perm` (learned module ->
    true module, -1 if unmatched) and the per-layer fraction of true modules recovered.
    """
    from scipy.optimize import linear_sum_assignment  # here: scipy takes a third of a second to import

    prev = None
    perms, fractions = [], []
    for ins, true in zip(learned, truth):
        mapped = [frozenset(int(prev[a]) if prev is not None else int(a) for a in m) for m in ins]
        true_sets = [frozenset(t) for t in true]
        score = np.zeros((len(mapped), len(true_sets)))
        for j, m in enumerate(mapped):
            for t, s in enumerate(true_sets):
                score[j, t] = (m == s) + 1e-2 * len(m & s) + 1e-6 * (j == t)
        rows, cols = linear_sum_assignment(score, maximize=True)
        perm = np.full(len(mapped), -1)
        perm[rows] = cols
        fractions.append(sum(mapped[j] == true_sets[t] for j, t in zip(rows, cols)) / len(true_sets))
        perms.append(perm)
        prev = perm
    return perms, fractions


def output_routing(outputs: list[int], true_outputs, perms, learned_widths, true_widths, skip_output: bool) -> float:
    """Fraction of output bits read from the matched true module (last layer, or all layers with skip_output)."""
    if skip_output:
        true_off = np.cumsum([0, *true_widths[:-1]])
        to_truth = np.concatenate([np.where(p >= 0, p + true_off[i], -1) for i, p in enumerate(perms)])
        true_outputs = [int(true_off[-1]) + o for o in true_outputs]
    else:
        to_truth = perms[-1]
    return sum(int(to_truth[o]) == t for o, t in zip(outputs, true_outputs)) / len(true_outputs)


def recover(routing: dict, circuits: list[Circuit], tables=None, skip_output: bool = False) -> dict:
    """Recovery metrics of one replicate.

    routing: `inputs[layer][task][module]`, `outputs[task]` and, for shared models,
    `locations[layer][task][slot]` (as in results.json). tables: the outputs of the trained
    modules on {0,1}^k, per layer [modules, 2^k] (one library [library, 2^k] for shared models),
    or None to skip `specialisation`.
    """
    library = list(dict.fromkeys(op for c in circuits for op in c.library))
    shared = "locations" in routing
    locs, spec, routing_frac, out_frac = [], [], [], []
    layer_fracs = []
    for t, c in enumerate(circuits):
        learned = [layer[t] for layer in routing["inputs"]]
        perms, fractions = match_layers(learned, c.routing)
        n_true = [len(layer) for layer in c.layers]
        layer_fracs.append(fractions)
        routing_frac.append(sum(f * n for f, n in zip(fractions, n_true)) / sum(n_true))
        learned_widths = [len(layer) for layer in learned]
        out_frac.append(output_routing(routing["outputs"][t], c.outputs, perms, learned_widths, n_true, skip_output))
        for i, (perm, layer) in enumerate(zip(perms, c.layers)):
            for j, true in enumerate(perm):
                if true < 0:
                    continue
                op = layer[true].op
                if shared:
                    module = routing["locations"][i][t][j]
                    locs.append((module, library.index(op)))
                if tables is not None:
                    table = tables[0] if shared else tables[i]
                    row = table[routing["locations"][i][t][j] if shared else j]
                    spec.append(separates(np.asarray(row), gate_table(op, len(layer[true].inputs))))
    n_modules = sum(len(layer) for c in circuits for layer in c.layers)
    exact = [float(all(f == 1 for f in fr) and o == 1) for fr, o in zip(layer_fracs, out_frac)]
    result = {
        "exact_structure": float(np.mean(exact)),
        "input_routing": float(np.mean(routing_frac)),
        "input_routing_layers": [float(x) for x in np.mean(layer_fracs, 0)] if len({len(f) for f in layer_fracs}) == 1 else None,
        "output_routing": float(np.mean(out_frac)),
    }
    if shared:
        result["slot_assignment"] = slot_assignment(locs, n_modules)
    if tables is not None:
        result["specialisation"] = sum(spec) / n_modules
    return result


def slot_assignment(pairs: list[tuple[int, int]], n_slots: int) -> float:
    """Fraction of true slots whose (learned module, true module) agree under the best relabelling."""
    from scipy.optimize import linear_sum_assignment

    if not pairs:
        return 0.0
    counts = np.zeros((max(p[0] for p in pairs) + 1, max(p[1] for p in pairs) + 1))
    for learned, true in pairs:
        counts[learned, true] += 1
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / n_slots)


@torch.no_grad()
def module_tables(model) -> list[list[np.ndarray]]:
    """Per replicate, per layer (one entry for a shared library): each module's output on {0,1}^k."""
    k = int(model.routers[0].k)
    banks = [model.bank] if model.shared else list(model.banks)
    per_bank = []
    for bank in banks:
        R, n = bank.weights[0].shape[:2]
        x = torch.from_numpy(binary_rows(k)).float().to(bank.weights[0].device)
        x = x[None, :, None, :].expand(R, -1, n, -1)
        per_bank.append(bank(x).squeeze(-1).transpose(1, 2).cpu().numpy())  # [R, n, 2^k]
    return [[b[r] for b in per_bank] for r in range(per_bank[0].shape[0])]


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
    tables = module_tables(model)
    skip = bool(getattr(model, "skip_output", False))
    subs = sub_functions(model, task)
    return [recover(s, task.circuits, t, skip) | {"sub_functions": f} for s, t, f in zip(model.routing_summary(), tables, subs)]


def gate_values(circuit: Circuit, x: np.ndarray) -> np.ndarray:
    """Every gate's value [rows, gates] (layer by layer) on inputs x [rows, n_inputs] (0/1)."""
    h, values = np.asarray(x, dtype=np.uint8), []
    for layer in circuit.layers:
        h = np.stack([GATES[g.op](h[:, list(g.inputs)]) for g in layer], 1).astype(np.uint8) & 1
        values.append(h)
    return np.concatenate(values, 1)


@torch.no_grad()
def sub_functions(model, task) -> list[float]:
    """Per replicate, the mean over circuits of the fraction of its gates that some module computes
    (up to negation) on the rows of the circuit's task, with the hard (evaluation) routing."""
    R = model.routers[0].logits.shape[0]
    was = model.training
    model.eval()
    outputs = torch.cat(model.layers(task.x.expand(R, *task.x.shape), task.task_id.expand(R, -1)), 2)  # [R, rows, M]
    model.train(was)
    per_circuit = []
    for t, c in enumerate(task.circuits):
        rows = (task.task_id == t).nonzero().flatten()
        truth = torch.from_numpy(gate_values(c, task.x[rows].round().cpu().numpy())).bool().to(outputs.device)
        o = outputs[:, rows, :, None]  # [R, rows, M, 1]
        ones, zeros = truth[None, :, None, :], ~truth[None, :, None, :]  # [1, rows, 1, G]
        inf = torch.tensor(float("inf"), device=o.device)
        hi1, lo1 = torch.where(ones, o, -inf).amax(1), torch.where(ones, o, inf).amin(1)  # [R, M, G]
        hi0, lo0 = torch.where(zeros, o, -inf).amax(1), torch.where(zeros, o, inf).amin(1)
        found = ((lo1 > hi0) | (hi1 < lo0)).any(1).float().mean(1)  # [R]: constant gates count as found
        per_circuit.append(found)
    return torch.stack(per_circuit).mean(0).cpu().tolist()


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
    totals: dict[str, float] = {}
    for _ in range(draws):
        routing = {
            "inputs": [[[list(rng.permutation(w)[:k]) for _ in range(n)] for _ in range(T)] for w, n in zip(reads, widths)],
            "outputs": [list(rng.permutation(out_width)[:n_out]) for _ in range(T)],
        }
        if library:
            routing["locations"] = [[list(rng.integers(0, library, n)) for _ in range(T)] for n in widths]
        for key, value in recover(routing, list(circuits), None, skip_output).items():
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
