"""predict and evaluate without their optional packages, in fresh processes where Pillow or
matplotlib cannot be imported: predict ends in one line saying what to install; evaluate prints
its numbers, writes its files and says which pictures it did not draw. (Bad input in this
process: tests/unit/test_use_model.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, run_dir_with_two_checkpoints


@pytest.fixture
def run_dir(tmp_path):
    return run_dir_with_two_checkpoints(tmp_path / "run")


def test_predict_without_pillow_says_how_to_install_it(run_dir):
    code = (
        "import sys; sys.modules['PIL'] = None\n"
        "from pipeline.predict import main\n"
        f"sys.exit(main([{str(run_dir)!r}, 'digit.png']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: predict needs Pillow to read images (the project's predict extra): pip install "
        "pillow"
    ]


def test_evaluate_without_matplotlib_prints_its_numbers_and_says_what_it_skipped(
    run_dir, tiny_mnist
):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pipeline.evaluate import main\n"
        f"sys.exit(main([{str(run_dir)!r}, '--data-root', {str(tiny_mnist)!r}, "
        "'--tracking', 'disabled']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy:" in proc.stdout and "wrote eval.json, confusion_matrix.json in" in (
        proc.stdout
    )
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        "warning: matplotlib is not installed: confusion_matrix.png and mistakes.png were not "
        "drawn (pip install matplotlib, the project's report extra)"
    )
    assert (run_dir / "eval" / "eval.json").exists()
    assert not (run_dir / "eval" / "confusion_matrix.png").exists()
