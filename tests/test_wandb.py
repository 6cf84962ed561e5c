"""W&B runs as written to disk (offline): what each replicate's run holds, and the worker's batched
history logging (`modnets.logger._log_rows`) against W&B's own `run.log`."""

import json

import pytest
from test_pictures import wandb_records

from modnets.train import run

NOT_COMPARED = {"_timestamp", "_runtime"}  # wall-clock values


def history_by_step(run_dir) -> dict[int, dict]:
    """step -> the values logged at that step (W&B may write one step in several records)."""
    steps = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            steps.setdefault(items["_step"], {}).update({k: v for k, v in items.items() if k not in NOT_COMPARED})
    return steps


def summary_of(run_dir) -> dict:
    summary = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
    return summary


def test_each_replicate_run_holds_its_own_history_at_its_epochs(cfg_in, tmp_path):
    # 20 evaluations, at most 7 points: metrics every 3 epochs (and the last); recovery every 2
    results = run(cfg_in("experiment=modular", "trainer.epochs=20", "trainer.replicates=3", "logger.mode=offline",
                         "logger.max_points=7", "logger.pictures=false"))
    logged, measured = {3, 6, 9, 12, 15, 18, 20}, set(range(2, 21, 2))
    finals = set()
    for result in results:
        (run_dir,) = (tmp_path / "run" / f"seed_{result['config']['seed']}" / "wandb").glob(f"*-{result['wandb_id']}")
        steps = history_by_step(run_dir)
        assert set(steps) == logged | measured and all(row["epoch"] == step for step, row in steps.items())
        for h in result["history"]:
            if h["epoch"] in logged:  # this replicate's own metrics, not another's
                assert {k: steps[h["epoch"]][k] for k in h} == h
        for h in result["recovery"]["history"]:
            row = steps[h["epoch"]]
            assert all(row[f"recovery/{k}"] == v for k, v in h.items() if isinstance(v, float))
        assert summary_of(run_dir)["final/heldout_acc"] == result["final"]["heldout_acc"]
        finals.add(result["final"]["train_loss"])
    assert len(finals) == 3  # three different seeds, three different runs


def records_of(tmp_path, name: str, log) -> dict[int, dict]:
    """The history of an offline W&B run that `log(run)` filled (W&B in this process)."""
    import wandb

    with wandb.init(mode="offline", dir=str(tmp_path / name), reinit="create_new",
                    settings=wandb.Settings(silent=True, console="off")) as wandb_run:
        log(wandb_run)
    (run_dir,) = (tmp_path / name / "wandb").glob("offline-run-*")
    return history_by_step(run_dir)


@pytest.mark.parametrize("odd", [None, "text"])  # plain numbers (batched), or a row that is not (row by row)
def test_batched_rows_are_the_records_run_log_writes(tmp_path, odd):
    from modnets.logger import _log_rows

    rows = [{"epoch": e, "loss": 1.0 / e, "acc": e / 10, "exact": e % 2 == 0, "count": e} for e in (1, 2, 4, 7)]
    if odd is not None:
        rows[2]["note"] = odd
    calls = []

    def batched(wandb_run):
        log = wandb_run.log
        wandb_run.log = lambda *a, **k: calls.append(a) or log(*a, **k)  # counts the rows logged one by one
        _log_rows(wandb_run, rows)

    expected = records_of(tmp_path, "one_by_one", lambda r: [r.log(row, step=row["epoch"]) for row in rows])
    assert records_of(tmp_path, "batched", batched) == expected
    assert len(calls) == (0 if odd is None else len(rows))
    assert sorted(expected) == [1, 2, 4, 7] and expected[7]["loss"] == 1.0 / 7 and expected[2]["exact"] is True


def test_history_texts_are_the_texts_w_and_b_writes_for_each_value():
    """The batched rows' `value_json` is, byte for byte, what W&B's history encoder writes for
    each value alone (the installed wandb's encoder: pydantic-core's or the standard library's)."""
    import random
    import struct

    from wandb.util import json_dumps_safer_history

    from modnets.logger import _number_texts

    rng = random.Random(0)
    values = [0.0, -0.0, 1 / 3, 7.579544029403025e-05, 1e-300, 5e-324, 1e300, float("nan"), float("inf"),
              float("-inf"), 0, -5, 2**63, True, False]
    values += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(2000)]
    values += [rng.random() * 10 ** rng.randint(-30, 30) for _ in range(2000)]
    assert list(_number_texts(values)) == [json_dumps_safer_history(v) for v in values]


def test_the_selected_run_shares_the_replicates_worker(cfg_in, tmp_path, monkeypatch):
    import subprocess

    popen, workers = subprocess.Popen, []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **k: workers.append(args) or popen(args, **k))
    results = run(cfg_in("experiment=modular", "trainer.epochs=4", "trainer.replicates=2", "trainer.select=train_loss",
                         "logger.mode=offline", "logger.pictures=false"))
    assert sum("modnets.logger" in args for args in workers) == 1  # one W&B worker, one W&B start-up
    (run_dir,) = (tmp_path / "run" / "selected" / "wandb").glob("offline-run-*")
    chosen = json.loads((tmp_path / "run" / "selected" / "results.json").read_text())["selection"]["chosen"]
    steps = history_by_step(run_dir)
    assert sorted(steps) == [1, 2, 3, 4] and steps[4]["train_loss"] == results[chosen - 1]["final"]["train_loss"]


def test_an_offline_run_builds_no_usage_metrics_exporter(tmp_path):
    """W&B's SDK sends usage metrics (OpenTelemetry) to W&B's servers, never for offline runs: the
    worker turns them off before its first offline run, so it neither builds nor imports the exporter."""
    import wandb
    from wandb.analytics.opentelemetry import opentelemetry_proxy

    from modnets.logger import _init

    wandb_run = _init(wandb, {"mode": "offline", "dir": str(tmp_path), "id": "usage000", "name": "n"}, {})
    try:
        wandb_run.log({"epoch": 1, "loss": 0.5}, step=1)  # the first log is where the SDK builds its exporter
        assert opentelemetry_proxy.get_open_telemetry_proxy() is None
    finally:
        wandb_run.finish()
    assert history_by_step(next((tmp_path / "wandb").glob("offline-run-*")))[1]["loss"] == 0.5
