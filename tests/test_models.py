import pytest
import torch

from modnets.config import ConfigError
from modnets.models import MLP, ModularNet, ModuleBank, parameter_groups
from modnets.recovery import recover
from modnets.routers import Learned
from modnets.tasks import BooleanTask


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def batch(task, rows, R):
    return task.x[rows].expand(R, -1, -1), task.task_id[rows].expand(R, -1), task.y[rows].expand(R, -1, -1)


@pytest.mark.parametrize("shared", [False, True])
def test_straight_through_gradients_reach_router_logits(shared):
    task = BooleanTask([6, 3, 2, 2])
    model = ModularNet(task, Learned(), gens(0), shared=shared)
    x, tid, y = batch(task, torch.arange(16), 1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, tid), y)
    loss.backward()
    routers = [model.output_router, *model.routers] + (list(model.locations) if shared else [])
    for r in routers:
        assert r.logits.grad is not None and r.logits.grad.abs().sum() > 0


def test_forward_value_is_a_hard_selection():
    """Whatever the scores, module inputs are exactly the selected previous-layer outputs."""
    task = BooleanTask([6, 3, 2, 2])
    model = ModularNet(task, Learned(known_inputs=True, known_outputs=True), gens(0))
    x, tid, _ = batch(task, torch.arange(64), 1)
    selected = model.routers[0](x, tid).x[:, :, 0]  # [R, B, modules, k]
    assert torch.equal(selected[0, :, 0], x[0][:, [0, 1]])
    assert torch.equal(selected[0, :, 2], x[0][:, [4, 5]])


def test_known_routing_selects_ground_truth():
    task = BooleanTask([6, 3, 3, 2, 2])
    model = ModularNet(task, Learned(known_inputs=True, known_outputs=True, known_locations=True), gens(0), shared=True)
    s = model.routing_summary()[0]
    assert s["inputs"] == [[layer] for layer in task.circuits[0].routing]
    assert s["outputs"] == [[0, 1]]
    assert s["locations"] == [[layer] for layer in task.circuits[0].slots]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "logits" in n)


def test_known_routers_are_not_in_the_optimizer():
    task = BooleanTask([6, 3, 2, 2])
    model = ModularNet(task, Learned(known_inputs=True, known_outputs=True), gens(0))
    names = {g["name"] for g in parameter_groups(model, Learned(), 0.01)}
    assert names == {"modules"}
    learned = ModularNet(task, Learned(), gens(0), shared=True)
    groups = {g["name"]: g["lr"] for g in parameter_groups(learned, Learned(lr=0.3, location_lr=0.2), 0.01)}
    assert groups == {"modules": 0.01, "input_routers": 0.3, "location_routers": 0.2}


def test_replicate_r_is_the_model_of_seed_plus_r():
    task = BooleanTask([6, 3, 2, 2])
    many = ModularNet(task, Learned(), gens(5, 6, 7), shared=True)
    one = ModularNet(task, Learned(), gens(6), shared=True)
    for (name, p), q in zip(many.named_parameters(), one.parameters()):
        assert torch.equal(p[1], q[0]), name
    x, tid, _ = batch(task, torch.arange(64), 3)
    assert torch.allclose(many(x, tid)[1], one(x[:1], tid[:1])[0], atol=1e-6)


def test_mlp_pruning_removes_the_requested_fraction():
    task = BooleanTask([6, 3, 2, 2])
    model = MLP(task, None, gens(0, 1), hidden=[36, 36], prune_percent=30)
    kept = sum(m.sum() for m in model.masks) / sum(m.numel() for m in model.masks)
    assert abs(kept.item() - 0.7) < 0.01
    x, tid, _ = batch(task, torch.arange(8), 2)
    assert model(x, tid).shape == (2, 8, 2)


@pytest.mark.parametrize(
    "kwargs,routing,key",
    [
        ({"num_modules": [3, 3]}, Learned(known_inputs=True), "model.num_modules"),
        ({}, Learned(topk=4), "router.topk"),
        ({"num_modules": [3, 1]}, Learned(), "model.num_modules"),
    ],
)
def test_widths_that_cannot_work_are_config_errors(kwargs, routing, key):
    with pytest.raises(ConfigError, match=key):
        ModularNet(BooleanTask([6, 3, 2, 2]), routing, gens(0), **kwargs)


def test_widths_follow_the_task():
    model = ModularNet(BooleanTask([6, 3, 3, 2, 2]), Learned(), gens(0))
    assert [b.weights[0].shape[1] for b in model.banks] == [3, 3, 2]


def test_widen_multiplies_every_layer_but_the_last_and_recovery_still_finds_the_circuit():
    task = BooleanTask([6, 3, 3, 2, 2])
    model = ModularNet(task, Learned(), gens(0), widen=2)
    assert [b.weights[0].shape[1] for b in model.banks] == [6, 6, 2]
    assert [r.logits.shape[2:] for r in model.routers] == [(6, 6), (6, 6), (6, 2)]  # [R, T, choices, consumers]
    # the circuit on first-layer modules 1, 3, 5 and second-layer modules 0, 2, 4; the spares read other inputs
    inputs = [[[[0, 2], [0, 1], [1, 3], [2, 3], [3, 5], [4, 5]]], [[[1, 3], [0, 2], [3, 5], [0, 2], [1, 5], [0, 2]]],
              [[[0, 4], [2, 4]]]]
    assert recover({"inputs": inputs, "outputs": [[0, 1]]}, task.circuits)["exact_structure"] == 1.0
    inputs[1][0][4] = [1, 2]  # a second-layer module reads a spare
    assert recover({"inputs": inputs, "outputs": [[0, 1]]}, task.circuits)["exact_structure"] == 0.0
    with pytest.raises(ConfigError, match="model.widen"):
        ModularNet(task, Learned(known_inputs=True), gens(0), widen=2)


def test_module_bank_computes_what_its_einsum_did_bit_for_bit():
    """ModuleBank runs the bmm of einsum("rbni,rnio->rbno") directly: same outputs and gradients."""
    bank = ModuleBank([torch.Generator().manual_seed(s) for s in (1, 2, 3)], 3, [2, 12, 1])
    x = torch.randn(3, 8, 3, 2, generator=torch.Generator().manual_seed(5))

    def einsum_bank(x):
        for i, (w, b) in enumerate(zip(bank.weights, bank.biases)):
            x = torch.einsum("rbni,rnio->rbno", x, w) + b.unsqueeze(1)
            x = torch.relu(x) if i == 0 else x
        return x

    runs = []
    for forward in (bank, einsum_bank):
        xs = x.clone().requires_grad_()
        bank.zero_grad()
        out = forward(xs)
        (out.squeeze(-1) ** 2 * torch.arange(1.0, 4.0)).sum().backward()
        runs.append([out.detach(), xs.grad, *(p.grad.clone() for p in bank.parameters())])
    assert runs[0][0].abs().sum() > 0 and all(torch.equal(a, b) for a, b in zip(*runs))
