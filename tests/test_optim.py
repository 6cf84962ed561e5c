"""modnets.optim: the flat-buffer Adam is torch's Adam up to float rounding, and resumes exactly."""

import pytest
import torch

from modnets.optim import Adam, ExponentialLR
from modnets.train import Evaluator, build, fit


def groups_of(params, lrs):
    return [{"params": ps, "lr": lr, "name": f"g{i}"} for i, (ps, lr) in enumerate(zip(params, lrs))]


def loss_of(params, x):
    """A small non-linear loss that gives every parameter a different gradient."""
    w1, b1, w2 = params
    return ((torch.tanh(x @ w1 + b1) @ w2) ** 2).mean() + w1.abs().sum() * 1e-3


def train_pair(opt, ref, ours, theirs, x, gamma=0.97, steps=200):
    sched, ref_sched = ExponentialLR(opt, gamma), torch.optim.lr_scheduler.ExponentialLR(ref, gamma)
    for _ in range(steps):
        for o, params in ((opt, ours), (ref, theirs)):
            o.zero_grad(set_to_none=True)
            loss_of(params, x).backward()
            o.step()
        sched.step()
        ref_sched.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
@pytest.mark.parametrize("fused", [True, False])
def test_adam_is_torch_fused_adam_bit_for_bit_and_its_fallback_within_rounding(weight_decay, fused):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 7, generator=gen), torch.randn(7, generator=gen), torch.randn(7, 3, generator=gen)]
    x = torch.randn(16, 5, generator=gen)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = Adam(groups_of([ours[:2], ours[2:]], [0.01, 0.1]), lr=0.01, weight_decay=weight_decay, fused=fused)
    ref = torch.optim.Adam(groups_of([theirs[:2], theirs[2:]], [0.01, 0.1]), lr=0.01, weight_decay=weight_decay, fused=True)
    train_pair(opt, ref, ours, theirs, x)
    moved = sum((p.detach() - q).abs().max() for p, q in zip(ours, init))
    assert moved > 1.0, "the parameters moved, so agreement below is not trivial"
    for p, q in zip(ours, theirs):
        if fused:
            assert torch.equal(p, q)
        else:
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()


def test_adam_parameters_are_views_of_one_buffer_with_the_same_values():
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    before = [p.detach().clone() for p in params]
    opt = Adam(params, lr=0.1)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    opt.zero_grad()
    (params[0].sum() * 2 + params[1].sum()).backward()
    assert torch.equal(params[0].grad, torch.full((3, 4), 2.0)) and params[0].grad.data_ptr() == opt.grad.data_ptr()
    params[1].grad = None  # set to None behind its back: zero_grad reattaches the view
    opt.zero_grad()
    assert params[1].grad is not None and params[1].grad.abs().sum() == 0
    opt.step()
    assert params[0].data_ptr() == opt.flat.data_ptr()


def test_adam_checkpoint_round_trip_continues_exactly(cfg_in):
    cfg = cfg_in("experiment=modular", "trainer.epochs=3")
    a = build(cfg)
    fit(cfg, a.task, a.model, a.optimizer, a.scheduler, a.generators, Evaluator(a.task, 64), lambda e, m: None)
    b = build(cfg)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    for o in (a.optimizer, b.optimizer):
        o.zero_grad()
        for p in o.params:
            p.grad.fill_(0.5)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("experiment", ["modular", "shared", "mlp"])
def test_flop_count_is_torch_flop_counter_total(cfg_in, experiment):
    from torch.utils.flop_counter import FlopCounterMode

    from modnets.models import FlopCount

    b = build(cfg_in(f"experiment={experiment}", "trainer.replicates=2"))
    x, tid = b.task.x[:16].expand(2, -1, -1), b.task.task_id[:16].expand(2, -1)
    with FlopCounterMode(display=False) as ref:
        b.model(x, tid).sum().backward()
    with FlopCount() as ours:
        b.model(x, tid).sum().backward()
    assert ours.total == ref.get_total_flops() > 0
