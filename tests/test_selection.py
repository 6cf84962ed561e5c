"""trainer.select: the replicate with the lowest final training loss, chosen without held-out rows."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import make_cfg
from omegaconf import OmegaConf

from modnets.config import ConfigError, validate
from modnets.selection import choose
from modnets.tasks import BooleanTask
from modnets.train import build, run

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("aggregate", ROOT / "scripts" / "aggregate.py")
aggregate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aggregate)

SHORT = ["experiment=modular", "trainer.epochs=30", "trainer.eval_every=10", "trainer.select=train_loss"]
# Every Boolean task with a known circuit (bool_6_2 is a random table: no circuit to discover).
BOOLEAN_TASKS = sorted(p.stem for p in (ROOT / "conf" / "task").glob("bool_*.yaml") if p.stem != "bool_6_2")


def FlippedHeldout(**kwargs):
    """A Boolean task whose val, test and held-out labels are inverted; training rows unchanged."""
    task = BooleanTask(**kwargs)
    rows = task.splits["heldout"]
    task.y[rows] = 1 - task.y[rows]
    return task


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_choose_takes_the_lowest_finite_loss_and_the_lowest_seed_on_ties():
    assert choose([5, 6, 7], [0.3, 0.1, 0.2]) == 6
    assert choose([9, 4, 7], [0.1, 0.1, 0.2]) == 4
    assert choose([1, 2, 3], [math.nan, None, 0.9]) == 3
    assert choose([1, 2], [math.inf, None]) is None


def test_selection_never_reads_heldout_labels(tmp_path):
    """Changing only the held-out labels changes held-out accuracy, not the choice."""
    args = [*SHORT, "trainer.replicates=6"]
    run(make_cfg(*args, output_dir=str(tmp_path / "plain")))
    flipped = "task._target_=test_selection.FlippedHeldout"
    run(make_cfg(*args, flipped, output_dir=str(tmp_path / "flipped")))
    plain, other = (read(tmp_path / d / "selected" / "results.json") for d in ("plain", "flipped"))
    assert plain["selection"]["chosen"] == other["selection"]["chosen"]
    assert plain["selection"]["values"] == other["selection"]["values"]
    assert plain["final"]["train_loss"] == other["final"]["train_loss"] == min(plain["selection"]["values"])
    assert abs(plain["final"]["heldout_acc"] + other["final"]["heldout_acc"] - 1) < 1e-6  # the flip was seen


def test_selection_of_an_mlp_population_with_population_totals(cfg_in, tmp_path):
    cfg = cfg_in("experiment=mlp", "trainer.epochs=20", "trainer.replicates=4", "trainer.select=train_loss")
    results = run(cfg)
    selected = read(tmp_path / "run" / "selected" / "results.json")
    losses = [r["final"]["train_loss"] for r in results]
    best = results[losses.index(min(losses))]
    chosen = best["config"]["seed"]
    assert selected["selection"] == {"criterion": "train_loss", "among": [1, 2, 3, 4], "values": losses, "chosen": chosen}
    assert selected["history"] == best["history"] and selected["status"] == "completed"
    assert selected["config"]["seed"] == 1 and selected["config"]["trainer"]["replicates"] == 4
    assert selected["params"]["population_total"] == 4 * best["params"]["total"]
    assert selected["flops"]["population_train"] == 4 * best["flops"]["train"]
    assert all(r["config"]["trainer"]["select"] == "none" for r in results)  # each replicate: a single run of its seed


def test_populations_in_one_job_are_selected_alone_and_round_trip_through_the_aggregator(tmp_path):
    out = tmp_path / "sweep" / "job"
    run(make_cfg(*SHORT, "trainer.replicates=8", "trainer.population=4", output_dir=str(out)))
    chosen = {s: read(out / "selected" / f"seed_{s}" / "results.json") for s in (1, 5)}
    assert [c["selection"]["among"] for c in chosen.values()] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    alone = tmp_path / "alone"  # the second population run by itself: the same selected result
    run(make_cfg(*SHORT, "trainer.replicates=4", "seed=5", output_dir=str(alone)))
    by_itself = read(alone / "selected" / "results.json")
    assert by_itself["config_hash"] == chosen[5]["config_hash"]  # the same config, so one configuration when aggregated
    assert by_itself["selection"]["chosen"] == chosen[5]["selection"]["chosen"]
    assert by_itself["selection"]["values"] == pytest.approx(chosen[5]["selection"]["values"], abs=1e-5)  # batched: float noise
    runs, failures = aggregate.load(aggregate.find_results([str(tmp_path / "sweep")]))
    rows, varying, _ = aggregate.summarise(runs)
    assert not failures and len(runs) == 8 + 2
    assert "trainer.select" in varying and "trainer.replicates" in varying
    by_arch = {r["arch"]: r for r in rows}
    assert set(by_arch) == {"modular learned", "modular learned, best of 4"}
    best = by_arch["modular learned, best of 4"]
    assert best["n"] == 2 and best["seeds"] == "1 5"
    expected = sum(c["final"]["heldout_acc"] for c in chosen.values()) / 2
    assert best["final.heldout_acc_mean"] == pytest.approx(expected)
    assert by_arch["modular learned"]["n"] == 8
    assert aggregate.main([str(tmp_path / "sweep"), "--no-plots"]) == 0


def test_a_finished_run_gets_its_selection_when_relaunched_with_select(cfg_in, tmp_path):
    results = run(cfg_in("experiment=modular", "trainer.epochs=5", "trainer.replicates=3"))
    assert not (tmp_path / "run" / "selected").exists()
    again = run(cfg_in("experiment=modular", "trainer.epochs=5", "trainer.replicates=3", "trainer.select=train_loss"))
    assert again == results  # the replicates are reused, not retrained
    selected = read(tmp_path / "run" / "selected" / "results.json")
    assert selected["final"]["train_loss"] == min(r["final"]["train_loss"] for r in results)


@pytest.mark.parametrize("experiment", ["discover", "discover_deep"])
@pytest.mark.parametrize("task", BOOLEAN_TASKS)
def test_discover_composes_and_builds_for_every_boolean_task(task, experiment):
    cfg = make_cfg(f"experiment={experiment}", f"task={task}", "trainer.replicates=2")
    validate(cfg)
    assert cfg.trainer.select == "train_loss" and OmegaConf.select(cfg, "router.topk") == cfg.task.get("arity", 2)
    b = build(cfg)
    assert b.model(b.task.x[None, :4].expand(2, -1, -1), b.task.task_id[None, :4].expand(2, -1)).shape[:2] == (2, 4)


def test_discover_defaults_to_a_population_of_32_and_arity_follows_the_task():
    cfg = make_cfg("experiment=discover", "task=bool_random", "task.n_inputs=9", "task.arity=3")
    assert cfg.trainer.replicates == 32 and cfg.router.topk == 3


def test_bad_selection_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="trainer.select"):
        validate(make_cfg("trainer.select=val_loss"))
    with pytest.raises(ConfigError, match="trainer.population=3: expected a divisor of trainer.replicates=8"):
        validate(make_cfg("trainer.replicates=8", "trainer.population=3"))


BENCH = importlib.util.spec_from_file_location("routing_benchmark", ROOT / "scripts" / "routing_benchmark.py")
routing_benchmark = importlib.util.module_from_spec(BENCH)
BENCH.loader.exec_module(routing_benchmark)
BENCHMARK_TASKS = sorted(p.stem for p in (ROOT / "conf" / "benchmark_task").glob("*.yaml"))
BENCHMARK_ARCHS = ["mlp", "shared_known", "modular", "modular_gumbel", "modular_soft", "modular_soft_wide", "modular_sampling"]


@pytest.mark.parametrize("task", BENCHMARK_TASKS)
def test_routing_benchmark_cells_compose_and_build(task):
    for arch in BENCHMARK_ARCHS:
        cfg = make_cfg("experiment=routing_benchmark", f"benchmark_task={task}", f"arch={arch}", "trainer.replicates=2",
                       "trainer.population=1")
        b = build(cfg)
        assert b.task.circuits and len(b.seeds) == 2


def test_best_of_regroups_single_runs_into_larger_populations_by_training_loss_only():
    config = {"task._target_": "modnets.tasks.BooleanTask", "task.modularity": [6, 3, 3, 2, 2], "task.train_fraction": 0.8}
    losses = [0.5, 0.1, 0.3, 0.2, 0.05, 0.4, 0.6, 0.7]  # seeds 0..7; populations of 4: seeds 1 and 4 win
    runs = [{"arch": "modular soft wide", "seed": s, "config": config,
             "metrics": {"final.train_loss": loss, "final.heldout_acc": s / 10}} for s, loss in enumerate(losses)]
    other = {"final.train_loss": 0.0, "final.heldout_acc": 1.0}
    runs.append({**runs[0], "arch": "modular soft", "metrics": other})  # another method: not in the cell
    assert routing_benchmark.best_of(runs, ("[6, 3, 3, 2, 2]", 0.8, "modular soft wide"), 4) == [0.1, 0.4]
    assert routing_benchmark.best_of(runs, ("[6, 3, 3, 2, 2]", 0.8, "modular soft wide"), 8) == [0.4]
    assert routing_benchmark.best_of(runs, ("[6, 3, 3, 2, 2]", 0.5, "modular soft wide"), 4) == []


def test_routing_benchmark_sweep_runs_and_is_tabulated(tmp_path):
    from test_train import cli

    sweep = tmp_path / "bench"
    proc = cli("experiment=routing_benchmark", "benchmark_task=bool_6_2_2", "task.train_fraction=0.8", "arch=mlp,modular_soft",
               "trainer.epochs=2", "trainer.replicates=4", "trainer.population=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(sweep.rglob("selected/seed_*/results.json"))) == 4
    runs, failures = aggregate.load(aggregate.find_results([str(sweep)]))
    table = routing_benchmark.cells(runs)
    assert not failures and set(table) == {
        ("[6, 2, 2]", 0.8, method, selected) for method in ("mlp", "modular soft") for selected in (False, True)
    }
    assert table[("[6, 2, 2]", 0.8, "modular soft", True)]["n"] == 2 and table[("[6, 2, 2]", 0.8, "mlp", False)]["n"] == 4
    assert table[("[6, 2, 2]", 0.8, "mlp", False)]["exact"] is None  # no routing to recover
    text = routing_benchmark.markdown(table)
    assert "| modular soft, best of 2 | 2 |" in text and "| mlp | 4 |" in text


def test_the_selected_run_is_one_more_wandb_run(cfg_in, tmp_path):
    run(cfg_in("experiment=modular", "trainer.epochs=2", "trainer.replicates=2", "trainer.select=train_loss",
               "logger.mode=offline"))
    runs = list((tmp_path / "run").glob("seed_*/wandb/offline-run-*"))
    selected = list((tmp_path / "run" / "selected" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len(selected) == 1  # the two seeds and the selection


def test_a_finished_sweep_relaunched_with_select_selects_without_training(tmp_path):
    from test_train import cli

    args = ["-m", "seed=1", "experiment=modular", "trainer.epochs=2", "trainer.replicates=2", "logger.mode=disabled",
            "trainer.progress=false", f"hydra.sweep.dir={tmp_path}"]
    assert cli(*args).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("seed_*/results.json")}
    proc = cli(*args, "trainer.select=train_loss")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "modnets: skipped" in proc.stdout and len(list(tmp_path.rglob("selected/results.json"))) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("seed_*/results.json")} == before
