"""The training loop's per-epoch parts (modnets.train): draws made ahead in a thread, evaluation."""

import pytest
import torch

import modnets.train
from modnets.train import Draws, Evaluator, build, draw_epoch, fit


def train(cfg):
    b = build(cfg)
    history = []
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: history.append(m))
    return torch.stack(history), [p.detach().clone() for p in b.model.parameters()], b.generators


@pytest.mark.parametrize("overrides", [["experiment=modular"], ["experiment=modular_gumbel", "task.noise=0.1"]])
def test_draws_made_ahead_are_the_draws_made_in_turn(cfg_in, monkeypatch, overrides):
    """A run whose next epoch is drawn in a thread trains exactly as one drawing each epoch when it starts."""
    made = []
    monkeypatch.setattr(modnets.train, "AHEAD", 4)
    monkeypatch.setattr(modnets.train, "draw_ahead", lambda *a: made.append(True) or True)
    cfg = cfg_in(*overrides, "trainer.replicates=4", "trainer.epochs=4", "trainer.device=cpu")
    ahead, params, generators = train(cfg)
    assert made
    monkeypatch.setattr(modnets.train, "draw_ahead", lambda *a: False)
    in_turn, params_in_turn, generators_in_turn = train(cfg)
    assert torch.equal(ahead, in_turn)
    for p, q in zip(params, params_in_turn, strict=True):
        assert torch.equal(p, q)
    for g, h in zip(generators, generators_in_turn, strict=True):  # the last epoch draws nothing ahead
        assert torch.equal(g.get_state(), h.get_state())


def test_draws_ahead_only_on_cuda_without_a_checkpoint(cfg_in):
    b = build(cfg_in("experiment=modular", "trainer.replicates=64", "trainer.device=cpu"))
    saver = modnets.train.Checkpointer(cfg_in("trainer.checkpoint_every=0"), b.model, b.optimizer, b.scheduler, b.generators)
    cuda = torch.device("cuda")  # only its type is read
    assert modnets.train.draw_ahead(saver, 64, cuda)
    assert not modnets.train.draw_ahead(saver, 8, cuda)
    assert not modnets.train.draw_ahead(saver, 64, torch.device("cpu"))
    saver = modnets.train.Checkpointer(cfg_in("trainer.checkpoint_every=5"), b.model, b.optimizer, b.scheduler, b.generators)
    assert not modnets.train.draw_ahead(saver, 64, cuda)  # the checkpoint saves the generators at epoch ends


def test_a_failed_draw_ahead_is_raised_in_the_loop():
    calls = []

    def draw():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return len(calls)

    draws = Draws(draw, ahead=True)
    assert draws(more=True) == 1
    with pytest.raises(RuntimeError, match="boom"):
        draws(more=False)


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
