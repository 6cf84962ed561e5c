"""Tasks: whole datasets as tensors, named splits as index tensors (SPEC §1-2).

A task is everything the trainer and the models need to know about the data:

- `x` [rows, ...] inputs, `y` [rows, n_outputs] 0/1 targets, `task_id` [rows];
- `splits`: name -> row indices; `train` is drawn from, the others are evaluated
  (`heldout` is the union of every split that is not `train`);
- `circuits`: the ground-truth circuit of each sub-task, or None when the task
  has no modular structure; models read widths and known routing from them;
- `noise`: std of Gaussian noise added to training inputs each time they are drawn.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from modnets.circuits import PRESETS, Circuit
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
        return self.circuits[0].modularity if self.circuits else None

    def to(self, device) -> Task:
        self.x, self.y, self.task_id = self.x.to(device), self.y.to(device), self.task_id.to(device)
        self.splits = {k: v.to(device) for k, v in self.splits.items()}
        return self


def split_rows(n_rows: int, train_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """SPEC §2: a seeded permutation; `int(n * f)` train rows, the rest halved into val and test."""
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


def tabulate(
    circuits: list[Circuit], train_fraction: float, split_seed: int, noise: float, name: str
) -> Task:
    """Truth tables of one or more circuits, each split the same way, concatenated with task ids."""
    xs, ys, ids, splits = [], [], [], {"train": [], "val": [], "test": []}
    for t, c in enumerate(circuits):
        x, y = c.truth_table()
        for k, rows in split_rows(len(x), train_fraction, split_seed).items():
            splits[k].append(rows + sum(len(a) for a in xs))
        xs.append(x), ys.append(y), ids.append(np.full(len(x), t))
    splits = {k: torch.cat(v) for k, v in splits.items()}
    splits["heldout"] = torch.cat([splits["val"], splits["test"]])
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
    """The Boolean task of SPEC §1 with this modularity (`[6, 2]`: a random table, no structure)."""
    key = tuple(int(m) for m in modularity)
    name = "bool_" + "_".join(map(str, key))
    if len(key) == 2:
        x, y = random_table(key[0], key[1], table_seed)
        splits = split_rows(len(x), train_fraction, split_seed)
        splits["heldout"] = torch.cat([splits["val"], splits["test"]])
        t = torch.from_numpy
        return Task(t(x).float(), t(y).float(), torch.zeros(len(x), dtype=torch.long), splits, None, noise, name)
    if key not in PRESETS:
        known = ", ".join(str(list(k)) for k in [*PRESETS, (6, 2)])
        raise ConfigError("task.modularity", list(key), f"one of {known}")
    return tabulate([PRESETS[key]], train_fraction, split_seed, noise, name)
