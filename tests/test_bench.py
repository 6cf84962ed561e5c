"""scripts/bench.py --targets: each target judged on its measurement, or, with --baseline, on the
measurement in the units of the machine that set the targets (the baseline's figure over its time now)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def fake_cli_run(slow: float):
    """cli_run stand-in: this checkout's runs take fixed times; the baseline's take `slow` times its
    figures (a machine `slow` times slower than the one that set the targets)."""

    def run(replicates, mode, threads, device="cpu", tree=bench.ROOT):
        if tree == bench.ROOT:
            wall = {(1, "offline"): 3.3, (32, "disabled"): 4.0, (32, "offline"): 5.6, (1024, "disabled"): 22.0}[replicates, mode]
            train = {1: 1.1, 32: 2.0, 1024: 15.0}[replicates]
            return {"wall": wall, "cpu": wall * 1.2, "train": train, "inside": train + 1.0, "writing": 0.5}
        key = {(1, "offline"): "cli_1_offline", (32, "disabled"): "cli_32_disabled", (32, "offline"): "cli_32_offline",
               (1024, "disabled"): "cli_1024_disabled"}[replicates, mode]
        train = bench.BASELINE["train_1"] if replicates == 1 else 1.0
        return {"wall": bench.BASELINE[key] * slow, "cpu": 0.0, "train": train * slow, "inside": 0.0, "writing": 0.0}

    return run


def by_target(rows):
    return {r["target"]: r for r in rows}


def test_targets_are_judged_on_the_measurements_alone(monkeypatch, capsys):
    monkeypatch.setattr(bench, "cli_run", fake_cli_run(slow=1.5))
    rows = by_target(bench.targets(repeats=1, threads=None))
    assert rows["cli_1_offline"]["measured"] == 3.3 and not rows["cli_1_offline"]["met"]  # 3.3 s > 3.0 s
    assert rows["wandb_per_run"]["measured"] == pytest.approx(1.6 / 32 * 1e3)  # (5.6 - 4.0) / 32 runs: 50 ms
    assert rows["outside_1024"]["measured"] == pytest.approx(1.5) and rows["outside_1024"]["met"]
    assert rows["cli_1024_disabled"]["met"] is False and "scaled" not in rows["cli_1024_disabled"]


def test_with_a_baseline_each_target_is_scaled_by_its_commands_baseline(monkeypatch, capsys):
    monkeypatch.setattr(bench, "cli_run", fake_cli_run(slow=1.5))
    rows = by_target(bench.targets(repeats=1, threads=None, baseline=Path("/elsewhere")))
    one = rows["cli_1_offline"]
    assert one["measured"] == 3.3 and one["baseline_now_s"] == pytest.approx(6.8 * 1.5)
    assert one["scaled"] == pytest.approx(2.2) and one["met"]  # 3.3 s on a machine 1.5x slower: 2.2 s
    assert rows["train_1"]["scaled"] == pytest.approx(1.1 / 1.5, abs=1e-3)
    assert rows["step_1"]["scaled"] == pytest.approx(1.1 / 1.5 / 1400 * 1e3, abs=1e-3)
    assert rows["wandb_per_run"]["scaled"] == pytest.approx(1.6 / 32 * 1e3 / 1.5, abs=1e-3)  # by the disabled pair
    assert rows["cli_1024_disabled"]["scaled"] == pytest.approx(22.0 / 1.5, abs=1e-3) and rows["cli_1024_disabled"]["met"]
    assert "baseline now" in capsys.readouterr().out


def test_a_faster_machine_scales_the_measurements_up(monkeypatch, capsys):
    monkeypatch.setattr(bench, "cli_run", fake_cli_run(slow=0.5))  # the baseline runs in half its figures
    rows = by_target(bench.targets(repeats=1, threads=None, baseline=Path("/elsewhere")))
    assert rows["cli_32_offline"]["scaled"] == pytest.approx(11.2) and not rows["cli_32_offline"]["met"]
