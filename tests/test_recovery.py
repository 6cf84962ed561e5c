import numpy as np
import pytest

from modnets import recovery
from modnets.circuits import PRESETS
from modnets.train import build, run

C6322 = PRESETS[(6, 3, 2, 2)]  # XOR(0,1) XOR(2,3) XOR(4,5) | AND(0,1) AND(1,2) | outputs (0, 1)


@pytest.mark.parametrize("model", ["modular", "shared", "modular model.skip_output=true"])
def test_known_routing_recovers_everything(cfg_in, model):
    b = build(cfg_in(*f"model={model}".split(), "router=known", "trainer.replicates=3"))
    for m in recovery.measure(b.model, b.task):
        assert m["input_routing"] == m["output_routing"] == 1.0
        assert m["input_routing_layers"] == [1.0, 1.0]
        assert m.get("slot_assignment", 1.0) == 1.0


def test_input_routing_matches_a_hand_computed_example():
    # layer 1: learned modules read {2,3}, {0,1}, {4,0}: two of three true XORs, matched 0->1, 1->0, 2->2;
    # layer 2 reads learned modules (1,0) and (0,2) = true modules {0,1} and {1,2}: both right.
    routing = {"inputs": [[[[2, 3], [0, 1], [4, 0]]], [[[1, 0], [0, 2]]]], "outputs": [[0, 1]]}
    perms, fractions = recovery.match_layers([layer[0] for layer in routing["inputs"]], C6322.routing)
    assert perms[0].tolist() == [1, 0, 2] and fractions == [2 / 3, 1.0]
    m = recovery.recover(routing, [C6322])
    assert m["input_routing"] == pytest.approx(4 / 5)
    assert m["output_routing"] == 1.0
    swapped = recovery.recover({**routing, "outputs": [[1, 0]]}, [C6322])
    assert swapped["output_routing"] == 0.0


def test_slot_assignment_is_up_to_a_relabelling_of_the_library():
    # truth: XOR (library 0) in layer 1, AND (library 1) in layer 2; the learned library swaps the
    # labels and gets one XOR slot wrong: 4 of 5 slots under the relabelling 1->0, 0->1.
    routing = {
        "inputs": [[C6322.routing[0]], [C6322.routing[1]]],
        "outputs": [[0, 1]],
        "locations": [[[1, 1, 0]], [[0, 0]]],
    }
    assert recovery.recover(routing, [C6322])["slot_assignment"] == pytest.approx(4 / 5)


def test_specialisation_compares_module_truth_tables_with_the_gates():
    xor, and_ = recovery.gate_table("XOR", 2), recovery.gate_table("AND", 2)
    assert xor.tolist() == [0, 1, 1, 0] and and_.tolist() == [0, 0, 0, 1]
    assert recovery.separates(np.array([0.1, 2.0, 3.0, -1.0]), xor)
    assert recovery.separates(np.array([5.0, -2.0, -3.0, 4.0]), xor)  # XNOR: the same feature
    assert recovery.separates(np.array([0.1, 2.0, 3.0, -1.0]), and_)  # NAND, the same feature as AND
    assert not recovery.separates(np.array([0.1, 2.0, 3.0, 1.0]), and_)
    routing = {"inputs": [[C6322.routing[0]], [C6322.routing[1]]], "outputs": [[0, 1]]}
    good = [np.array([[0, 1, 1, 0]] * 3, float), np.array([[0, 0, 0, 1]] * 2, float)]
    assert recovery.recover(routing, [C6322], good)["specialisation"] == 1.0
    bad = [good[0], np.array([[0, 1, 1, 1], [0, 0, 0, 1]], float)]  # one AND module computes OR
    assert recovery.recover(routing, [C6322], bad)["specialisation"] == pytest.approx(4 / 5)


def test_random_router_baseline_matches_the_analytic_value():
    # [6,2,2]: each of 2 modules reads a random pair of 6 inputs (15 pairs); the expected fraction
    # of true pairs hit is 1 - (14/15)^2 = 29/225; outputs: 2 ordered picks of 2 modules, 1/2 right each.
    base = recovery.random_baseline([PRESETS[(6, 2, 2)]], (2,), 2, draws=4000)
    assert base["input_routing"] == pytest.approx(29 / 225, abs=0.02)
    assert base["output_routing"] == pytest.approx(0.5, abs=0.03)
    assert base["specialisation"] == pytest.approx(1 / 3)  # XOR: 2 of the C(4,2) output orders


def test_results_file_holds_recovery_with_baselines(cfg_in):
    shared = run(cfg_in("experiment=shared_known", "trainer.epochs=2"))[0]["recovery"]
    assert shared["input_routing"] == shared["slot_assignment"] == 1.0
    assert shared["init"]["input_routing"] == 1.0
    assert 0 < shared["random"]["input_routing"] < 0.6 and 0 < shared["random"]["slot_assignment"] < 1
    assert [h["epoch"] for h in shared["history"]] == [1, 2]
    assert run(cfg_in("experiment=mlp", "trainer.epochs=1"))[0]["recovery"] is None
