import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
os.environ.setdefault("WANDB_SILENT", "true")
ENV = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
QUIET = ["debug=quiet"]  # conf/debug/quiet.yaml: no W&B, no progress lines, one thread (the CI machine is shared)


def main_in_process(*argv: str) -> int:
    """`modnets-train ARGV` in this process through `modnets.train.main` (the console script, `modnets.cli`,
    adds the early W&B worker and `os._exit`, which would end the test process): its exit code."""
    from modnets.train import main

    saved = sys.argv
    sys.argv = ["modnets-train", *argv]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved


def make_cfg(*overrides, output_dir=None):
    """Compose conf/config.yaml with overrides, as modnets-train would (quiet: W&B off unless asked)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*QUIET, *overrides] + ([f"output_dir={output_dir}"] if output_dir else []))
    return cfg


def cli(*args, cwd=None, env=None):
    """modnets-train ARGS as a user runs it, in a new process; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "modnets.train", *args], capture_output=True, text=True, cwd=cwd or ROOT,
        env={**ENV, **(env or {})}, timeout=300,
    )


@pytest.fixture
def cfg_in(tmp_path):
    """cfg_in(*overrides): a composed config writing into a temporary folder."""
    return lambda *o: make_cfg(*o, output_dir=str(tmp_path / "run"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks train fastest on one thread, and a loaded machine makes two threads much slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
