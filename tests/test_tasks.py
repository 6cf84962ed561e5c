import itertools

import numpy as np
import pytest
import torch

from modnets.circuits import PRESETS
from modnets.config import ConfigError
from modnets.tasks import BooleanTask, split_rows


@pytest.mark.parametrize(
    "modularity,positives", [([6, 2, 2], [32, 32]), ([6, 3, 2, 2], [16, 16]), ([6, 3, 3, 2, 2], [24, 24])]
)
def test_truth_table_positive_counts(modularity, positives):
    task = BooleanTask(modularity)
    assert task.x.shape == (64, 6)
    assert task.y.sum(0).tolist() == positives


def test_rows_in_itertools_product_order():
    task = BooleanTask([6, 3, 2, 2])
    assert task.x.tolist() == [list(r) for r in itertools.product([0, 1], repeat=6)]


def test_6_3_2_2_truth_table_by_hand():
    x, y = PRESETS[(6, 3, 2, 2)].truth_table()
    f = np.stack([x[:, 0] ^ x[:, 1], x[:, 2] ^ x[:, 3], x[:, 4] ^ x[:, 5]], 1)
    assert (y == np.stack([f[:, 0] & f[:, 1], f[:, 1] & f[:, 2]], 1)).all()


def test_6_3_3_2_2_truth_table_by_hand():
    x, y = PRESETS[(6, 3, 3, 2, 2)].truth_table()
    f1, f2, f3 = x[:, 0] ^ x[:, 1], x[:, 2] ^ x[:, 3], x[:, 4] ^ x[:, 5]
    g1, g2, g3 = f1 & f2, f2 & f3, f1 & f3
    assert (y == np.stack([g1 | g3, g2 | g3], 1)).all()


def test_ground_truth_structure_matches_spec():
    c = PRESETS[(6, 3, 3, 2, 2)]
    assert c.routing == [[[0, 1], [2, 3], [4, 5]], [[0, 1], [1, 2], [0, 2]], [[0, 2], [1, 2]]]
    assert c.slots == [[0, 0, 0], [1, 1, 1], [2, 2]]
    assert PRESETS[(6, 3, 2, 2)].slots == [[0, 0, 0], [1, 1]]
    assert PRESETS[(6, 2, 2)].routing == [[[0, 1], [2, 3]]]


@pytest.mark.parametrize("fraction,sizes", [(0.8, (51, 6, 7)), (0.5, (32, 16, 16))])
def test_split_sizes(fraction, sizes):
    task = BooleanTask([6, 3, 2, 2], train_fraction=fraction)
    s = task.splits
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == sizes
    assert len(s["heldout"]) == sizes[1] + sizes[2]
    every = torch.cat([s["train"], s["val"], s["test"]])
    assert sorted(every.tolist()) == list(range(64))  # disjoint and complete


def test_split_is_seeded():
    a, b, c = (split_rows(64, 0.8, seed) for seed in (40, 40, 41))
    assert torch.equal(a["train"], b["train"])
    assert not torch.equal(a["train"], c["train"])


@pytest.mark.parametrize("fraction", [0.99, 1.0, 0.0, -0.5])
def test_bad_train_fraction_is_a_config_error(fraction):
    with pytest.raises(ConfigError, match="task.train_fraction"):
        BooleanTask([6, 3, 2, 2], train_fraction=fraction)


def test_unknown_modularity_is_a_config_error():
    with pytest.raises(ConfigError, match="task.modularity"):
        BooleanTask([6, 4, 2])


def test_unstructured_table_has_no_circuit():
    task = BooleanTask([6, 2])
    assert task.circuits is None and task.y.shape == (64, 2)
