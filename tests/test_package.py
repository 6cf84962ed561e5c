"""A plain, non-editable install works from any folder: the wheel ships the config tree, its
imports are core dependencies, and an installed copy reports no git commit."""

import json
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from modnets.results import git_commit

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ["sklearn", "matplotlib", "scipy"]  # optional-dependency modules: a default run must not need them


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the repository (the checkout stays free of build/ folders)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("modnets", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    return next((tmp_path / "dist").glob("modnets-*.whl"))


def fresh_venv(tmp_path: Path) -> Path:
    """A new venv whose own site-packages is empty; the dependencies come from this environment's
    site-packages through a .pth line (whose own .pth files, e.g. an editable modnets, are not read),
    and importing an extra's module fails, as in an install without extras."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    own = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (own / "deps.pth").write_text("\n".join(deps) + "\n")
    (own / "no_extras.pth").write_text(f"import sys; sys.modules.update(dict.fromkeys({EXTRAS!r}))\n")
    return venv


def test_wheel_installs_and_runs_the_default_experiment_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import modnets; print(modnets.__file__); print(modnets.CONF_DIR)"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert all(str(venv) in p for p in where) and where[1].endswith("modnets/conf")  # the wheel's copy, not the checkout
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [venv / "bin" / "modnets-train", "debug=fast"],  # the shipped debug preset: 2 epochs, quiet
        cwd=work, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next((work / "outputs").glob("*/*/results.json")).read_text())
    assert result["status"] == "completed" and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["git_commit"] is None  # an installed copy is no checkout
    assert result["recovery"] is not None  # the recovery metrics ran (without scipy: modnets.recovery.assign)
    assert (next((work / "outputs").glob("*/*")) / "circuit.png").exists()  # pictures need no extra (Pillow is core)


def test_git_commit_is_the_commit_of_the_checkout_that_runs():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert git_commit() == (head or None)  # a clone of modnets: its HEAD (an exported tree without .git: None)
