"""modnets.step: the training step by hand gives bit for bit autograd's losses and gradients."""

import pytest
import torch
import torch.nn.functional as F

import modnets.step
import modnets.train
from modnets.step import SMALL_BMM, dot, from_lanes, hand_step, to_lanes
from modnets.train import Evaluator, build, fit

COVERED = [
    ["experiment=modular"],
    ["experiment=modular_known"],
    ["experiment=mlp"],
    ["experiment=modular", "model.hidden=[5,7]", "router.topk=3", "task.noise=0.1"],  # deeper modules, arity 3
    ["experiment=mlp", "trainer.batch_size=5"],
    ["experiment=modular", "router.tau=0.5", "optimizer.lr=0.05"],  # a temperature: gradients divided by it
    ["experiment=modular", "model.widen=4", "model.hidden=[40]"],  # products over torch's small-bmm bound: BLAS
]


LANES = 64  # replicates at which these tests run the lane step (modnets.step.LANES is higher: speed)


@pytest.fixture(autouse=True)
def lanes_from_64(monkeypatch):
    """The lane step from LANES replicates in every test here, so that it is tested at a size that builds fast."""
    monkeypatch.setattr(modnets.step, "LANES", LANES)


def autograd_step(model, x, task_id, y):
    """The trainer's autograd path: losses [R] and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    losses = F.binary_cross_entropy_with_logits(model(x, task_id, {}), y, reduction="none").mean((1, 2))
    losses.sum().backward()
    return losses.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("overrides", COVERED)
@pytest.mark.parametrize("replicates", [1, 3, LANES])  # LANES: modnets.step.lane_step where the shapes allow
def test_hand_step_equals_autograd_bit_for_bit(cfg_in, overrides, replicates):
    b = build(cfg_in(*overrides, f"trainer.replicates={replicates}", "trainer.device=cpu"))
    model, task = b.model, b.task
    hand = hand_step(model, getattr(model, "routing", None))
    assert hand is not None
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # several minibatches, and weights that moved in between
        idx = task.splits["train"][torch.randint(len(task.splits["train"]), (replicates, 8), generator=g)]
        x, task_id, y = task.x[idx] + 0.1 * torch.randn(idx.shape + task.x.shape[1:], generator=g), task.task_id[idx], task.y[idx]
        losses, grads = autograd_step(model, x, task_id, y)
        model.zero_grad(set_to_none=True)
        hand_losses = hand(x, y)
        hand_grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.equal(hand_losses, losses)
        for p, a, h in zip((p for p in model.parameters() if p.requires_grad), grads, hand_grads, strict=True):
            assert torch.equal(a, h), f"gradient of a {tuple(p.shape)} parameter"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("shape", [(8, 2, 12), (8, 12, 1), (8, 6, 6), (2, 8, 12), (12, 8, 1), (3, 8, 4), (8, 1, 12), (16, 24, 1)])
def test_dot_in_lanes_is_small_bmm_bit_for_bit(shape):
    """lane_step's premise: torch's bmm on matrices under SMALL_BMM entries x inner sums in order."""
    rows, inner, cols = shape
    assert rows * inner * cols < SMALL_BMM
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, rows, inner, generator=g), torch.randn(300, inner, cols, generator=g)
    a[a.abs() < 0.3] = 0.0  # zeros: products of either sign, sums that cancel
    a[:, 0] *= 1e4
    la, lb = to_lanes(a), to_lanes(b)  # [rows, inner, 300], [inner, cols, 300]
    lanes = from_lanes(dot((la[:, k, None], lb[k]) for k in range(inner)))
    assert torch.equal(torch.bmm(a, b).view(torch.int32), lanes.contiguous().view(torch.int32))  # signs of zero too


def test_lane_step_runs_at_many_replicates(cfg_in):
    b = build(cfg_in("experiment=modular", f"trainer.replicates={LANES}", "trainer.device=cpu"))
    hand = hand_step(b.model, b.model.routing)
    rows = b.task.splits["train"][:8].expand(LANES, -1)
    b.optimizer.zero_grad()
    hand(b.task.x[rows], b.task.y[rows])
    assert hand.lanes == {8: True}  # every product of a batch-8 step is a small bmm
    assert all(p.grad.abs().sum() > 0 for p in b.model.parameters())


@pytest.mark.parametrize("overrides", [["experiment=modular"], ["experiment=modular_known"], ["experiment=mlp"]])
def test_evaluation_forward_equals_the_training_forward(cfg_in, overrides):
    """`ModuleBank.evaluate` (no autograd, another layout) gives the numbers of `forward`."""
    b = build(cfg_in(*overrides, "trainer.replicates=3", "trainer.device=cpu"))
    x, task_id = b.task.x.expand(3, -1, -1), b.task.task_id.expand(3, -1)
    b.model.eval()
    with torch.no_grad():
        evaluated = b.model(x, task_id)
    assert torch.equal(b.model(x, task_id).detach(), evaluated)


def test_hand_step_gradients_reach_router_logits(cfg_in):
    b = build(cfg_in("experiment=modular", "trainer.device=cpu"))
    hand = hand_step(b.model, b.model.routing)
    rows = b.task.splits["train"][None]
    b.optimizer.zero_grad()
    hand(b.task.x[rows], b.task.y[rows])
    for router in [*b.model.routers, b.model.output_router]:
        assert router.logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=shared"],  # location routers: autograd
        ["experiment=modular_gumbel"],  # Gumbel noise
        ["experiment=modular", "router.entropy=0.1"],  # a regulariser adds a loss term
        ["experiment=modular", "router=soft"],
        ["experiment=modular", "router=sampling"],
        ["experiment=mlp", "model.prune_percent=20"],
        ["experiment=multitask"],  # a router row per task
    ],
)
def test_hand_step_leaves_other_models_to_autograd(cfg_in, overrides):
    b = build(cfg_in(*overrides, "trainer.device=cpu"))
    assert hand_step(b.model, getattr(b.model, "routing", None)) is None


@pytest.mark.parametrize(
    "overrides, replicates", [(["experiment=modular"], 2), (["experiment=mlp"], 2), (["experiment=modular"], LANES)]
)
def test_training_by_hand_equals_training_through_autograd(cfg_in, monkeypatch, overrides, replicates):
    def train(cfg):
        b = build(cfg)
        history = []
        fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: history.append(m))
        return torch.stack(history), list(b.model.parameters())

    cfg = cfg_in(*overrides, "trainer.epochs=5", f"trainer.replicates={replicates}", "task.noise=0.05", "trainer.device=cpu")
    by_hand, params = train(cfg)
    monkeypatch.setattr(modnets.train, "hand_step", lambda model, method: None)
    through_autograd, autograd_params = train(cfg)
    assert torch.equal(by_hand, through_autograd)
    for p, q in zip(params, autograd_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "overrides, one_thread",
    [
        (["experiment=modular"], True),
        (["experiment=mlp"], True),
        (["experiment=mlp", "trainer.replicates=32"], False),  # 32 x 2.8k parameters x 64 rows: big enough to split
        (["experiment=digits_cnn", "trainer.epochs=1"], False),  # images: torch's default
    ],
)
def test_threads_null_picks_one_thread_for_small_models_only(cfg_in, monkeypatch, overrides, one_thread):
    monkeypatch.setattr(modnets.train, "TORCH_THREADS", 3)  # torch's default on a 3-core machine
    cfg = cfg_in(*overrides, "trainer.threads=null", "trainer.device=cpu")
    b = build(cfg)
    assert modnets.train.auto_threads(b.model, b.task, int(cfg.trainer.batch_size)) == (1 if one_thread else 3)
    assert torch.get_num_threads() == (1 if one_thread else 3)
