"""The command's start and end (modnets.cli): W&B's worker started before torch's import when the
command line looks like one run with W&B on, never when W&B is off, ended on a config error; a
single run's fast exit leaves every file complete."""

import json
import os
import time
from pathlib import Path

import pytest
from conftest import cli
from test_pictures import read_wandb_file
from test_wandb import summary_of

import modnets
from modnets import logger


@pytest.mark.parametrize(
    "argv, starts",
    [
        ([], True),
        (["experiment=modular", "trainer.replicates=32"], True),
        (["logger.mode=online"], True),
        (["logger.mode=disabled"], False),
        (["experiment=quickstart"], False),  # the preset turns W&B off
        (["experiment=routing_benchmark"], False),  # the preset is a sweep
        (["-m", "seed=1,2"], False),
        (["--multirun", "seed=1,2"], False),
        (["hydra.mode=MULTIRUN"], False),
        (["--help"], False),
        (["--cfg", "job"], False),
        (["experiment=no_such_preset"], True),  # Hydra reports it; the guess only starts W&B early
    ],
)
def test_the_worker_starts_early_only_for_one_run_with_wandb_on(argv, starts):
    assert logger.single_run_with_wandb(argv, modnets.CONF_DIR) is starts


def test_an_unadopted_early_worker_is_ended():
    logger.prelaunch(["experiment=modular"], modnets.CONF_DIR)
    (worker,) = logger.PRELAUNCHED
    logger.discard()
    assert logger.PRELAUNCHED == [] and worker.returncode is not None


def processes_with(marker: str) -> list[str]:
    """Ids of the processes whose environment holds MODNETS_TEST_MARK=marker (children inherit it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"MODNETS_TEST_MARK={marker}".encode() in environ.read_bytes().split(b"\0"):
                found.append(environ.parent.name)
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_config_error_ends_the_early_worker_and_exits_2(tmp_path):
    marker = f"config-error-{os.getpid()}"
    proc = cli("experiment=modular", "trainer.epochs=-3", f"hydra.run.dir={tmp_path}", env={"MODNETS_TEST_MARK": marker})
    assert proc.returncode == 2 and "trainer.epochs" in proc.stderr
    deadline = time.time() + 10  # W&B's service notices its parent's end by itself
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == []
    assert not (tmp_path / "wandb").exists()


def test_no_wandb_import_when_wandb_is_off(tmp_path):
    proc = cli("experiment=modular", "trainer.epochs=2", "logger.mode=disabled", f"hydra.run.dir={tmp_path}",
               env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0 and json.loads((tmp_path / "results.json").read_text())["wandb_id"] is None
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and not any(name.split(".")[0] == "wandb" for name in imported)


def test_a_single_run_returns_with_its_files_and_wandb_run_complete(tmp_path):
    proc = cli("experiment=modular", "trainer.epochs=10", "logger.mode=offline", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0 and "held-out accuracy" in proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{result['wandb_id']}")
    records = read_wandb_file(run_dir)  # read at once: the command returned after W&B finished the run
    assert any(r.WhichOneof("record_type") == "exit" for r in records)
    assert summary_of(run_dir)["final/heldout_acc"] == result["final"]["heldout_acc"]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def composed(argv: list[str], once: bool) -> dict:
    """The job's config and Hydra's node as a `@hydra.main` entry point gets them for `modnets-train
    ARGV`, through `config.compose_once` or Hydra's own two compositions; and how often Hydra composed."""
    import sys

    import hydra
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from modnets.config import compose_once

    seen, load = {"loads": 0}, ConfigLoaderImpl._load_configuration_impl

    def counted(self, *args, **kwargs):
        seen["loads"] += 1
        return load(self, *args, **kwargs)

    @hydra.main(version_base="1.3", config_path=str(modnets.CONF_DIR), config_name="config")
    def task(cfg):
        seen["job"], seen["hydra"] = OmegaConf.to_yaml(cfg), OmegaConf.to_yaml(HydraConfig.get())

    saved, sys.argv = sys.argv, ["modnets-train", *argv]
    ConfigLoaderImpl._load_configuration_impl = counted
    try:
        (compose_once(task) if once else task)()
    finally:
        sys.argv, ConfigLoaderImpl._load_configuration_impl = saved, load
    return seen


@pytest.mark.parametrize(
    "overrides", [[], ["experiment=modular", "seed=3", "logger.mode=disabled"], ["hydra.mode=RUN", "trainer.epochs=2"]]
)
def test_a_single_run_is_composed_once_into_the_config_hydra_composes_twice(overrides, tmp_path):
    argv = [*overrides, f"hydra.run.dir={tmp_path}"]
    hydra_way, once = composed(argv, once=False), composed(argv, once=True)
    assert (hydra_way["loads"], once["loads"]) == (2, 1)
    assert once["job"] == hydra_way["job"] and once["hydra"] == hydra_way["hydra"]
    assert "mode: RUN" in once["hydra"] and (tmp_path / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("overrides", [["hydra.mode=MULTIRUN"], ["hydra.mode=MULTIRUN", "seed=1,2"]])
def test_a_sweep_takes_hydras_own_way(overrides, tmp_path):
    argv = [*overrides, f"hydra.sweep.dir={tmp_path}"]
    hydra_way, once = composed(argv, once=False), composed(argv, once=True)
    assert once["job"] == hydra_way["job"] and once["hydra"] == hydra_way["hydra"] and "mode: MULTIRUN" in once["hydra"]
    assert once["loads"] > hydra_way["loads"]  # the run's composition was tried first


def test_a_bad_override_fails_as_in_hydra(tmp_path, monkeypatch):
    from hydra.errors import HydraException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra raises rather than printing
    errors = []
    for once in (False, True):
        with pytest.raises(HydraException) as e:
            composed(["trainer.nope=1", f"hydra.run.dir={tmp_path}"], once=once)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "nope" in errors[0]
