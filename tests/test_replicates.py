"""trainer.replicates: R seeds in one batched model, each replicate the same run as a single seed."""

import json

import pytest
import torch

from modnets.train import Evaluator, build, fit, run


def train_briefly(cfg, epochs=2):
    b = build(cfg)
    initial = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    history = []
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: history.append(m))
    return initial, b.model, history


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=modular"],
        ["experiment=shared"],
        ["experiment=modular_gumbel", "task.noise=0.1"],  # per-sample Gumbel draws and input noise
        ["experiment=shared", "router=gumbel", "router.per_sample=false"],  # per-batch Gumbel draws
        ["experiment=shared_known"],
        ["experiment=mlp", "model.prune_percent=20"],
    ],
)
def test_replicate_r_matches_single_run_with_seed_plus_r(cfg_in, overrides):
    common = [*overrides, "trainer.epochs=2", "trainer.device=cpu"]
    init_many, many, hist_many = train_briefly(cfg_in(*common, "seed=10", "trainer.replicates=3"))
    init_one, one, hist_one = train_briefly(cfg_in(*common, "seed=12"))
    for name, p in init_one.items():
        assert torch.equal(init_many[name][2], p[0]), f"initial {name}"
    for (name, p), q in zip(many.named_parameters(), one.parameters()):
        assert torch.allclose(p[2], q[0], atol=1e-5), f"trained {name}"
    for m_many, m_one in zip(hist_many, hist_one):  # loss, acc, exact on every split after each epoch
        assert torch.allclose(m_many[2], m_one[0], atol=1e-5)


def test_replicates_are_different_networks(cfg_in):
    _, model, history = train_briefly(cfg_in("experiment=modular", "trainer.replicates=2", "trainer.epochs=1"))
    w = model.banks[0].weights[0]
    assert not torch.equal(w[0], w[1])


def test_replicates_write_one_results_file_per_seed(cfg_in, tmp_path):
    results = run(cfg_in("experiment=modular", "seed=5", "trainer.replicates=4", "trainer.epochs=2"))
    files = sorted((tmp_path / "run").glob("seed_*/results.json"))
    assert [f.parent.name for f in files] == ["seed_5", "seed_6", "seed_7", "seed_8"]
    written = [json.loads(f.read_text()) for f in files]
    assert [w["config"]["seed"] for w in written] == [5, 6, 7, 8]
    assert all(w["config"]["trainer"]["replicates"] == 1 for w in written)
    assert [w["replicate"]["index"] for w in written] == [0, 1, 2, 3]
    assert [r["final"] for r in results] == [w["final"] for w in written]
