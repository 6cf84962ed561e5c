"""The router family: every method trains, gets gradients into its logits, writes routing and
recovery; a method defined outside the package plugs in by `router._target_`; known routing is
fixed; structure metrics; the signal-preserving init."""

from dataclasses import dataclass

import pytest
import torch

from modnets import recovery, routers
from modnets.circuits import PRESETS
from modnets.config import ConfigError
from modnets.models import ModularNet
from modnets.routers import InputRouter, Learned, Routed, Router, Soft, apply_mask, pick_rows, topk_mask
from modnets.tasks import BooleanTask, RandomCircuitTask
from modnets.train import Evaluator, build, fit, run

METHODS = ["learned", "gumbel", "soft", "sampling"]
C6322 = PRESETS[(6, 3, 2, 2)]


class SoftmaxTopKRouter(InputRouter):
    """Hard top-k in value, softmax (not sigmoid) straight-through gradients."""

    def forward(self, h, task_id, noise=None):
        logits = pick_rows(self.logits, task_id)
        mask = topk_mask(logits, self.k)
        if self.training:
            s = torch.softmax(logits / self.tau, dim=2)
            mask = mask + (s - s.detach()).unsqueeze(3)
        return Routed(apply_mask(h, mask).unsqueeze(2), None)


@dataclass
class SoftmaxStraightThrough(Router):
    """A router method that lives outside the package: one class (plus its selector)."""

    def learned_input_router(self, logits, k, shape, sets):
        _, width, n = shape
        return SoftmaxTopKRouter(logits, k, width, n, self.tau, fixed=False, sets=sets)


def one_step(cfg):
    """Build, one training step by hand, return the model (its logits' gradients kept)."""
    b = build(cfg)
    rows = b.task.splits["train"][:8]
    R = len(b.seeds)
    x, tid, y = b.task.x[rows], b.task.task_id[rows].expand(R, -1), b.task.y[rows].expand(R, -1, -1)
    x = x.expand(R, *x.shape)
    noise = {k: torch.randn(R, 8, *s).abs() for k, s in routers.noise_shapes(b.model).items()}
    per_output = torch.nn.functional.binary_cross_entropy_with_logits(b.model(x, tid, noise), y, reduction="none")
    extra = b.model.routing.loss(b.model, per_output, 0.0)
    (per_output.mean() + (0 if extra is None else extra.sum())).backward()
    return b.model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setting", ["model=modular", "model=shared", "experiment=multitask", "experiment=digits_shared"])
def test_every_method_gets_gradients_into_its_router_logits(cfg_in, method, setting):
    net = one_step(cfg_in(setting, f"router={method}", "trainer.replicates=2"))
    trainable = routers.selectors(net)
    # 2 input and 1 output routers (+ 2 location routers; + an image router and its locations)
    assert len(trainable) == {"model=modular": 3, "experiment=digits_shared": 7}.get(setting, 5)
    for m in trainable:  # (a library of one image module has nothing to choose: no gradient)
        assert m.logits.grad is not None and (m.logits.grad.abs().sum() > 0) == (m.logits.shape[2] > 1), type(m).__name__


@pytest.mark.parametrize("method", METHODS)
def test_known_routing_is_fixed_under_every_method(cfg_in, method):
    net = one_step(cfg_in("model=shared", f"router={method}", "router.known_inputs=true",
                          "router.known_outputs=true", "router.known_locations=true"))
    assert routers.selectors(net) == []
    fixed = routers.selectors(net, trainable=False)
    assert len(fixed) == 5 and all(m.logits.grad is None and not m.logits.requires_grad for m in fixed)
    assert routers.noise_shapes(net) == {}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_writes_routing_and_recovery(cfg_in, method):
    results = run(cfg_in("experiment=modular", f"router={method}", "trainer.replicates=4", "trainer.epochs=60",
                         "trainer.eval_every=10"))
    first, last = results[0]["history"][0], results[0]["history"][-1]
    assert sum(r["final"]["train_loss"] for r in results) < sum(r["history"][0]["train_loss"] for r in results)
    assert first["epoch"] == 10 and last["epoch"] == 60
    for r in results:
        assert len(r["routing"]["inputs"]) == 2 and len(r["routing"]["outputs"][0]) == 2
        rec = r["recovery"]
        assert rec["exact_structure"] in (0.0, 1.0) and 0 <= rec["sub_functions"] <= 1
        assert ("discretisation_gap_heldout" in rec) == (method == "soft")


def test_a_router_method_defined_outside_the_package_trains(cfg_in):
    cfg = cfg_in("experiment=modular", "router._target_=tests.test_routers.SoftmaxStraightThrough",
                 "trainer.replicates=4", "trainer.epochs=80", "trainer.eval_every=10")
    b = build(cfg)
    assert type(b.routing).__name__ == "SoftmaxStraightThrough"
    assert all(type(m).__name__ == "SoftmaxTopKRouter" for m in b.model.routers)
    before = b.model.routers[0].logits.detach().clone()
    history = []
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: history.append(m))
    assert not torch.equal(before, b.model.routers[0].logits)
    first, last = history[0][:, 0, 0], history[-1][:, 0, 0]  # [R] training loss after 10 and 80 epochs
    assert last.mean() < 0.9 * first.mean()


def test_soft_router_anneals_to_its_end_temperature_and_evaluates_hard(cfg_in):
    cfg = cfg_in("experiment=modular", "router=soft", "router.tau_end=0.1", "trainer.epochs=3")
    b = build(cfg)
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: None)
    assert all(m.tau == pytest.approx(0.1) for m in routers.selectors(b.model))
    b.model.eval()
    x, tid = b.task.x[None], b.task.task_id[None]
    routed = b.model.routers[0](x, tid)
    chosen = b.model.routers[0].selection()[0, 0]  # [modules, k]
    assert routed.weights is None and torch.equal(routed.x[0, :, 0], x[0][:, chosen])


def test_soft_router_uses_all_candidate_sets_or_a_softmax_per_input():
    task = BooleanTask([6, 3, 2, 2])
    model = ModularNet(task, Soft(), [torch.Generator().manual_seed(0)])
    assert model.routers[0].logits.shape == (1, 1, 15, 3)  # C(6, 2) input pairs per module
    routed = model.routers[0](task.x[None], task.task_id[None])
    assert routed.x.shape == (1, 64, 15, 3, 2) and torch.allclose(routed.weights.sum(2), torch.ones(1, 1, 3))
    assert model.output_router.logits.shape == (1, 1, 2, 2)  # ordered picks: a softmax per output bit
    few = ModularNet(task, Soft(max_sets=10), [torch.Generator().manual_seed(0)])
    assert few.routers[0].logits.shape == (1, 1, 6, 6)  # 3 modules x 2 inputs, each a softmax over 6


def test_regularisers_add_gradients_and_measure_duplicates():
    p = torch.zeros(1, 1, 4, 3)
    p[0, 0, 1] = 1.0  # all three consumers choose 1
    assert routers.overlap(p).item() == 1.0 and routers.entropy(p).item() == pytest.approx(0.0)
    p = torch.eye(3)[None, None].expand(1, 1, 3, 3)  # three consumers, three distinct choices
    assert routers.overlap(p).item() == 0.0
    task = BooleanTask([6, 3, 2, 2])
    model = ModularNet(task, Learned(entropy=0.1, duplicate=1.0), [torch.Generator().manual_seed(0)])
    model.routing.loss(model, None, 0.5).sum().backward()
    assert model.routers[0].logits.grad.abs().sum() > 0 and model.output_router.logits.grad.abs().sum() > 0
    assert Learned().loss(model, None, 0.0) is None  # no weights: the training loss is exactly the task's


def test_exact_structure_is_up_to_relabelling_and_catches_a_wrong_wiring():
    # truth: XOR(0,1) XOR(2,3) XOR(4,5) | AND(f0,f1) AND(f1,f2) | outputs (g0, g1).
    relabelled = {"inputs": [[[[4, 5], [0, 1], [2, 3]]], [[[1, 2], [2, 0]]]], "outputs": [[0, 1]]}
    assert recovery.recover(relabelled, [C6322])["exact_structure"] == 1.0
    # hand-checked wrong wiring: the second AND reads f0 and f2 (modules 1 and 0 of layer 1) instead of f1, f2
    wrong = {"inputs": [[[[4, 5], [0, 1], [2, 3]]], [[[1, 2], [1, 0]]]], "outputs": [[0, 1]]}
    m = recovery.recover(wrong, [C6322])
    assert m["exact_structure"] == 0.0 and m["input_routing"] == pytest.approx(4 / 5)
    swapped = {**relabelled, "outputs": [[1, 0]]}  # outputs read in the wrong order
    assert recovery.recover(swapped, [C6322])["exact_structure"] == 0.0


def test_known_routing_trained_recovers_the_exact_structure_and_sub_functions(cfg_in):
    result = run(cfg_in("experiment=modular_known", "trainer.epochs=150", "trainer.eval_every=50"))[0]
    assert result["recovery"]["exact_structure"] == 1.0
    assert result["final"]["train_acc"] == 1.0 and result["recovery"]["sub_functions"] == 1.0
    assert result["recovery"]["random"]["exact_structure"] < 0.01


def test_sub_functions_of_an_untrained_network_are_partial():
    task = BooleanTask([6, 3, 2, 2])
    model = ModularNet(task, Learned(known_inputs=True, known_outputs=True), [torch.Generator().manual_seed(s) for s in range(4)])
    found = recovery.sub_functions(model, task)
    assert len(found) == 4 and all(f < 1.0 for f in found)  # an untrained module is no XOR


@pytest.mark.parametrize("n_inputs", [8, 16])
def test_lsuv_init_keeps_the_signal_through_five_layers(n_inputs):
    task = RandomCircuitTask(n_inputs=n_inputs, depth=5, samples=1024)
    known = Learned(known_inputs=True, known_outputs=True)
    std = {}
    for init in ("torch", "lsuv"):
        model = ModularNet(task, known, [torch.Generator().manual_seed(s) for s in range(3)], init=init)
        with torch.no_grad():
            model.eval()
            std[init] = model(task.x[None].expand(3, -1, -1), task.task_id[None].expand(3, -1)).std(1)
    assert std["torch"].max() < 0.1  # the default init loses the signal
    assert ((std["lsuv"] > 0.7) & (std["lsuv"] < 1.5)).all()  # unit variance at the output


@pytest.mark.slow
@pytest.mark.parametrize("n_inputs", [8, 16])
def test_known_routing_solves_depth_5_random_circuits_with_lsuv(cfg_in, n_inputs):
    results = run(cfg_in("experiment=scaling_sweep", "model=modular", "router=known", "task.depth=5",
                         f"task.n_inputs={n_inputs}"))
    assert min(r["final"]["train_acc"] for r in results) > 0.98  # torch's init: 0.62-0.73 at 16 inputs
    assert min(r["final"]["heldout_acc"] for r in results) > 0.94


@pytest.mark.parametrize(
    ("override", "key"),
    [("router.anneal=fast", "router.anneal"), ("router.tau_end=0", "router.tau_end"),
     ("router.duplicate=-1", "router.duplicate"), ("model.init=xavier", "model.init")],
)
def test_bad_router_and_init_values_fail_with_the_key(cfg_in, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(cfg_in("router=soft", override))


def test_lsuv_refuses_shared_modules(cfg_in):
    with pytest.raises(ConfigError, match="model.init"):
        build(cfg_in("model=shared", "model.init=lsuv"))
