"""The package as `pip install .` (not editable) leaves it, used from an empty directory far from
the checkout: `lenet-train --config cpu` trains (the shipped configs are package data),
`--version` prints the version, every console command answers `--help`, and the package's
declared requirements are all present."""

from __future__ import annotations

import os
import site
import subprocess
import sys

from pipeline import __version__

from helpers import REPO

COMMANDS = ["train", "evaluate", "export", "predict", "report", "bench", "sweep"]


def test_an_installed_package_works_from_an_empty_directory(tiny_mnist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # Its requirements come from this environment (no download of torch): path entries, not
    # site directories, so this checkout's editable install is not seen there. Every site
    # directory of this one: a virtual environment made with --system-site-packages has its
    # packages in two.
    sp = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(sp, "_requirements.pth"), "w") as f:
        f.writelines(f"{path}\n" for path in site.getsitepackages())
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert "lenet-ddp" not in check.stdout, check.stdout  # every requirement it declares is met

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MNIST_ROOT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONNOUSERSITE="1")
    where = subprocess.run(
        [str(py), "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=empty, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # not the checkout
    bin_ = venv / "bin"
    version = subprocess.run([str(bin_ / "lenet-train"), "--version"], cwd=empty, env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert version.stdout.strip() == f"lenet-train (lenet-ddp) {__version__}", version.stderr
    for name in COMMANDS:
        shown = subprocess.run([str(bin_ / f"lenet-{name}"), "--help"], cwd=empty, env=env,
                               capture_output=True, text=True)  # fmt: skip
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: lenet-{name}"), name
    trained = subprocess.run(
        [str(bin_ / "lenet-train"), "--config", "cpu", "train.max_steps=20",
         f"data.root={tiny_mnist}", "data.download=false", "train.batch_size=32",
         "data.val_size=64"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "config: cpu = " in trained.stdout and "/pipeline/configs/cpu.yaml" in trained.stdout
    run_dir = empty / "runs" / "cpu,data.val_size=64,train.batch_size=32,train.max_steps=20"
    assert (run_dir / "summary.json").exists() and any(run_dir.glob("ckpt-*.pt"))
