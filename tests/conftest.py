import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
os.environ.setdefault("WANDB_SILENT", "true")


def make_cfg(*overrides, output_dir=None):
    """Compose conf/config.yaml with overrides, as modnets-train would (W&B off unless asked)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["logger.mode=disabled", "trainer.progress=false", *overrides]
            + ([f"output_dir={output_dir}"] if output_dir else []),
        )
    return cfg


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
