"""The training loop's per-epoch parts (modnets.train): the random draws, evaluation."""

import pytest
import torch

import modnets.train
from modnets.train import Evaluator, build, draw_epoch, fit


def train(cfg):
    b = build(cfg)
    history = []
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: history.append(m))
    return torch.stack(history), [p.detach().clone() for p in b.model.parameters()], b.generators


@pytest.mark.parametrize("overrides", [["experiment=modular"], ["experiment=mlp"]])
def test_orders_drawn_at_once_train_as_one_randperm_per_replicate(cfg_in, monkeypatch, overrides):
    """A run whose minibatch orders come from modnets.permutations trains exactly as one calling
    torch.randperm per replicate, and leaves the generators in the same states."""
    made = []
    at_once = modnets.train.orders_at_once
    monkeypatch.setattr(modnets.train, "orders_at_once", lambda *a: made.append(at_once(*a)) or made[-1])
    monkeypatch.setattr(modnets.train, "MANY", 2)
    cfg = cfg_in(*overrides, "trainer.replicates=3", "trainer.epochs=14", "trainer.device=cpu")  # 14 x 50 draws: a twist
    fast, params, generators = train(cfg)
    assert made[-1] is not None
    monkeypatch.setattr(modnets.train, "MANY", 10**9)
    in_turn, params_in_turn, generators_in_turn = train(cfg)
    assert made[-1] is None
    assert torch.equal(fast, in_turn)
    for p, q in zip(params, params_in_turn, strict=True):
        assert torch.equal(p, q)
    for g, h in zip(generators, generators_in_turn, strict=True):
        assert torch.equal(g.get_state(), h.get_state())


def test_orders_are_drawn_at_once_only_when_nothing_else_is_drawn(cfg_in, monkeypatch):
    monkeypatch.setattr(modnets.train, "MANY", 2)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    assert modnets.train.orders_at_once(gens, 51, plain=True) is not None
    assert modnets.train.orders_at_once(gens, 51, plain=False) is None  # noise or a checkpoint: torch draws
    assert modnets.train.orders_at_once(gens[:1], 51, plain=True) is None  # fewer than MANY replicates


def test_draw_epoch_of_a_replicate_is_the_draw_of_its_single_run():
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    many = draw_epoch(gens(range(5, 9)), 13, (3,), 0.1, {"r": (2, 2)}, 2, False, torch.device("cpu"))
    one = draw_epoch(gens([7]), 13, (3,), 0.1, {"r": (2, 2)}, 2, False, torch.device("cpu"))
    assert torch.equal(many[0][2], one[0][0]) and torch.equal(many[1][2], one[1][0])
    assert torch.equal(many[2]["r"][2], one[2]["r"][0])


@pytest.mark.parametrize("overrides", [["experiment=modular"], ["experiment=shared"], ["experiment=mlp"]])
def test_evaluation_leaves_the_model_training_and_evaluates_it_in_eval_mode(cfg_in, overrides):
    b = build(cfg_in(*overrides, "trainer.replicates=2", "trainer.device=cpu"))
    modes = []
    hook = lambda m, args: modes.append(m.training)  # noqa: E731
    handles = [m.register_forward_pre_hook(hook) for m in b.model.modules()]
    evaluator = Evaluator(b.task, 16)  # chunks of 16 rows: several
    metrics = evaluator(b.model, 2)
    assert modes and not any(modes)
    assert all(m.training for m in b.model.modules())
    for h in handles:
        h.remove()
    b.model.eval()
    with torch.no_grad():  # the metrics of one chunk of every row, through nn.Module.train
        whole = Evaluator(b.task, 4096)(b.model, 2)
    assert torch.allclose(metrics, whole)
    assert metrics.shape == (2, len(b.task.splits), 3)
