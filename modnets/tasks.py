"""Tasks: whole datasets as tensors, named splits as index tensors (spec §1-2).

A task is everything the trainer and the models need to know about the data:

- `x` [rows, ...] inputs, `y` [rows, n_outputs] 0/1 targets, `task_id` [rows];
- `splits`: name -> row indices; `train` is drawn from, the others are evaluated
  (`heldout` is the union of every split that is not `train`; task sets add per-task
  `task{t}_train` and `task{t}_heldout`);
- `circuits`: the ground-truth circuit of each sub-task, or None when the task
  has no modular structure; models read widths and known routing from them;
- `noise`: std of Gaussian noise added to training inputs each time they are drawn.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from modnets.circuits import (
    MULTITASK,
    PRESETS,
    Circuit,
    bits,
    circuit_from_spec,
    default_widths,
    joint_modularity,
    random_circuit,
)
from modnets.config import ConfigError


class Task:
    def __init__(self, x, y, task_id, splits, circuits=None, noise=0.0, name="task"):
        self.x, self.y, self.task_id = x, y, task_id
        self.splits: dict[str, torch.Tensor] = splits
        self.circuits: list[Circuit] | None = circuits
        self.noise = float(noise)
        self.name = name

    @property
    def n_inputs(self) -> int:
        return self.x.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.y.shape[1]

    @property
    def n_tasks(self) -> int:
        return int(self.task_id.max()) + 1

    @property
    def modularity(self) -> list[int] | None:
        """Layer widths `[n, m1, ..., out]`; for a task set, the widest of each layer over its circuits."""
        return joint_modularity(self.circuits) if self.circuits else None

    def to(self, device) -> Task:
        self.x, self.y, self.task_id = self.x.to(device), self.y.to(device), self.task_id.to(device)
        self.splits = {k: v.to(device) for k, v in self.splits.items()}
        return self


def split_rows(n_rows: int, train_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """spec §2: a seeded permutation; `int(n * f)` train rows, the rest halved into val and test."""
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError("task.train_fraction", train_fraction, "a fraction strictly between 0 and 1")
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    n_train = int(n_rows * train_fraction)
    n_val = (n_rows - n_train) // 2
    n_test = n_rows - n_train - n_val
    if min(n_train, n_val, n_test) == 0:
        raise ConfigError(
            "task.train_fraction",
            train_fraction,
            f"a fraction leaving rows in train, val and test (got {n_train}/{n_val}/{n_test} of {n_rows})",
        )
    return {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}


def table_splits(n_rows: int, train_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """`split_rows` plus `heldout`: the validation and test rows together."""
    splits = split_rows(n_rows, train_fraction, seed)
    return splits | {"heldout": torch.cat([splits["val"], splits["test"]])}


def tabulate(
    circuits: list[Circuit], train_fraction: float, split_seed: int, noise: float, name: str
) -> Task:
    """Truth tables of one or more circuits, each split the same way, concatenated with task ids.
    Several circuits also get per-task splits `task{t}_train` and `task{t}_heldout`."""
    xs, ys, ids, splits = [], [], [], {"train": [], "val": [], "test": [], "heldout": []}
    per_task = {}
    for t, c in enumerate(circuits):
        x, y = c.truth_table()
        own = {k: rows + sum(len(a) for a in xs) for k, rows in table_splits(len(x), train_fraction, split_seed).items()}
        for k, rows in own.items():
            splits[k].append(rows)
        per_task |= {f"task{t}_train": own["train"], f"task{t}_heldout": own["heldout"]}
        xs.append(x), ys.append(y), ids.append(np.full(len(x), t))
    splits = {k: torch.cat(v) for k, v in splits.items()}
    if len(circuits) > 1:
        splits |= per_task
    return Task(
        torch.from_numpy(np.concatenate(xs)).float(),
        torch.from_numpy(np.concatenate(ys)).float(),
        torch.from_numpy(np.concatenate(ids)).long(),
        splits,
        circuits,
        noise,
        name,
    )


def random_table(n_inputs: int, n_outputs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The unstructured task (`[6, 2]`): a fixed random truth table."""
    x = np.array(list(itertools.product([0, 1], repeat=n_inputs)))
    y = np.random.default_rng(seed).integers(0, 2, size=(len(x), n_outputs))
    return x.astype(np.uint8), y.astype(np.uint8)


def BooleanTask(
    modularity: list[int],
    train_fraction: float = 0.8,
    split_seed: int = 40,
    noise: float = 0.0,
    table_seed: int = 0,
) -> Task:
    """The Boolean task of spec §1 with this modularity (`[6, 2]`: a random table, no structure)."""
    key = tuple(int(m) for m in modularity)
    name = "bool_" + "_".join(map(str, key))
    if len(key) == 2:
        x, y = random_table(key[0], key[1], table_seed)
        splits = table_splits(len(x), train_fraction, split_seed)
        t = torch.from_numpy
        return Task(t(x).float(), t(y).float(), torch.zeros(len(x), dtype=torch.long), splits, None, noise, name)
    if key not in PRESETS:
        known = ", ".join(str(list(k)) for k in [*PRESETS, (6, 2)])
        raise ConfigError("task.modularity", list(key), f"one of {known}")
    return tabulate([PRESETS[key]], train_fraction, split_seed, noise, name)


def MultiTask(
    tasks: list[int] = (0, 1, 2),
    train_fraction: float = 0.8,
    split_seed: int = 40,
    noise: float = 0.0,
) -> Task:
    """The multi-task set of spec §1 (`tasks` picks from its three circuits, e.g. [0, 2]):
    each task's table split the same way, rows tagged with their position in `tasks`."""
    picked = [int(t) for t in tasks]
    ok = len(picked) > 0 and len(set(picked)) == len(picked) and all(0 <= t < len(MULTITASK) for t in picked)
    allowed = f"distinct task numbers from {list(range(len(MULTITASK)))}"
    if not ok:
        raise ConfigError("task.tasks", picked, allowed)
    name = "bool_multitask_" + "_".join(map(str, picked))
    return tabulate([MULTITASK[t] for t in picked], train_fraction, split_seed, noise, name)


def RandomCircuitTask(
    n_inputs: int = 8,
    widths: list[int] | None = None,
    depth: int = 3,
    n_outputs: int = 2,
    arity: int = 2,
    gates: list[str] | None = None,
    circuit_seed: int = 0,
    samples: int | None = None,
    train_fraction: float = 0.8,
    split_seed: int = 40,
    noise: float = 0.0,
) -> Task:
    """A circuit from `circuits.random_circuit` and its data (`task=bool_random`).

    Widths: `widths`, or `default_widths(n_inputs, depth, n_outputs, arity)`. Rows: the whole
    truth table (n_inputs <= 20, rows in `itertools.product` order) when `samples` is null or
    at least 2^n_inputs; else `samples` distinct rows drawn without replacement (seeded by
    `split_seed`), so that train, val and test are disjoint sets of inputs.
    """
    if n_inputs is None:
        raise ConfigError("task.n_inputs", n_inputs, "an integer >= 1")
    n, k = int(n_inputs), int(arity)
    if widths is None:
        if int(depth) < 1:
            raise ConfigError("task.depth", depth, "a depth >= 1 (module layers)")
        if int(n_outputs) < 1:
            raise ConfigError("task.n_outputs", n_outputs, "at least one output")
        widths = default_widths(n, int(depth), int(n_outputs), k)
    c = random_circuit(n, list(widths), k, None if gates is None else list(gates), int(circuit_seed))
    rng = np.random.default_rng(int(split_seed))
    if samples is None or (n <= 62 and int(samples) >= 2**n):
        if n > 20:
            raise ConfigError("task.samples", samples, f"a number of rows to draw (2^{n} rows are too many to enumerate)")
        x = bits(np.arange(2**n), n)
    elif int(samples) < 3:
        raise ConfigError("task.samples", samples, "at least 3 rows (train, val and test)")
    elif n <= 20:
        x = bits(np.sort(rng.choice(2**n, int(samples), replace=False)), n)
    else:
        x = distinct_rows(rng, int(samples), n)
    splits = table_splits(len(x), train_fraction, split_seed)
    name = f"bool_random_{n}_" + "_".join(map(str, widths)) + f"_k{k}_s{circuit_seed}"
    t = torch.from_numpy
    y = c.evaluate(x)
    return Task(t(x).float(), t(y).float(), torch.zeros(len(x), dtype=torch.long), splits, [c], noise, name)


def distinct_rows(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """m distinct random rows of n bits (uniform without replacement), in the order drawn."""
    x = np.empty((0, n), dtype=np.uint8)
    while len(x) < m:
        x = np.concatenate([x, rng.integers(0, 2, size=(m - len(x), n), dtype=np.uint8)])
        _, first = np.unique(np.packbits(x, axis=1), axis=0, return_index=True)
        x = x[np.sort(first)]
    return x


def CircuitTask(
    n_inputs: int | None = None,
    layers: list | None = None,
    outputs: list[int] | None = None,
    circuits: list | None = None,
    name: str = "circuit",
    train_fraction: float = 0.8,
    split_seed: int = 40,
    noise: float = 0.0,
) -> Task:
    """A circuit you write yourself (`task=circuit`, docs/multitask.md): `n_inputs`, `layers` of gates
    `"GATE(i,j,...)"`, optional `outputs`; or `circuits`, a list of such {n_inputs, layers, outputs}
    for a multi-task set (equal inputs, depth and outputs; task ids in list order). The whole truth
    table, split and noised like the presets; known routing and the shared library come from it."""
    plain = lambda v: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v  # noqa: E731
    layers, outputs, circuits = plain(layers), plain(outputs), plain(circuits)
    if circuits is None:
        if layers is None:
            raise ConfigError("task.layers", layers, 'a list of layers of gates "GATE(i,j,...)" (or task.circuits)')
        built = [circuit_from_spec(n_inputs, layers, outputs, "task")]
    else:
        if layers is not None or n_inputs is not None:
            raise ConfigError("task.circuits", "...", "either task.circuits or task.n_inputs/layers/outputs, not both")
        if not isinstance(circuits, list) or not circuits or not all(isinstance(c, dict) for c in circuits):
            raise ConfigError("task.circuits", circuits, "a non-empty list of {n_inputs, layers, outputs}")
        for t, c in enumerate(circuits):
            if set(c) - {"n_inputs", "layers", "outputs"}:
                raise ConfigError(f"task.circuits[{t}]", sorted(c), "keys n_inputs, layers and outputs")
        built = [
            circuit_from_spec(c.get("n_inputs"), c.get("layers"), c.get("outputs"), f"task.circuits[{t}]")
            for t, c in enumerate(circuits)
        ]
        shapes = [c.modularity for c in built]
        same_ends = len({(s[0], len(s), s[-1]) for s in shapes}) == 1 and len({c.arity for c in built}) == 1
        if not same_ends:
            raise ConfigError("task.circuits", shapes, "circuits of equal inputs, depth, outputs and gate arity")
    if built[0].n_inputs > 20:
        raise ConfigError("task.n_inputs", built[0].n_inputs, "at most 20 inputs (the whole truth table is the dataset)")
    return tabulate(built, train_fraction, split_seed, noise, str(name))
