"""Using a trained model, on a real 1-epoch MNIST run: evaluate reproduces what training reported,
exported files run where this project cannot be imported, predict reads digits saved as a user
would have them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import evaluate
from pipeline.data import store
from pipeline.data.device import normalize_and_pad
from pipeline.export import main as export_main
from pipeline.training import checkpoint

from helpers import REPO, assert_ok, launch_cmd, require, train_here

PNG = b"\x89PNG\r\n\x1a\n"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # export --format onnx, and running it


def run_module(module: str, args: list[str], nproc: int = 1, **env) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (under torchrun when nproc > 1), as a user runs it."""
    cmd = launch_cmd(nproc, args)
    cmd[cmd.index("pipeline.train")] = module
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def real_run(mnist_root, tmp_path_factory) -> Path:
    """One epoch of configs/cpu.yaml on the real MNIST (about 98.6% test accuracy)."""
    run_dir = tmp_path_factory.mktemp("real") / "cpu"
    args = ["--config", "configs/cpu.yaml", "train.epochs=1", f"data.root={mnist_root}"]
    args += ["data.val_size=0"]  # every epoch tested, so the last one's numbers are logged
    args += [f"train.run_dir={run_dir}", "tracking.mode=disabled", "data.download=false"]
    assert_ok(train_here(args))
    return run_dir


def test_evaluate_gives_exactly_what_training_reported(real_run, mnist_root):
    proc = run_module("pipeline.evaluate", [str(real_run), "--data-root", str(mnist_root)])
    assert_ok(proc)
    logged = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((real_run / "summary.json").read_text())
    out = real_run / "eval"
    results = json.loads((out / "eval.json").read_text())
    assert results["test_accuracy"] == logged[-1]["test_accuracy"] == summary["test_accuracy"]
    assert results["test_loss"] == logged[-1]["test_loss"]
    assert results["test_count"] == 10_000 and results["global_step"] == logged[-1]["step"]
    assert f"{summary['test_accuracy'] * 100:.2f}% at this step (the same)" in proc.stdout

    matrix = torch.tensor(json.loads((out / "confusion_matrix.json").read_text())["matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10_000
    assert matrix.diag().sum() == results["correct"] == round(results["test_accuracy"] * 10_000)
    per_class = results["per_class_accuracy"]
    rows = matrix.sum(1).tolist()
    assert all(per_class[str(c)] == matrix[c, c].item() / rows[c] for c in range(10))

    mistakes = results["mistakes"]
    labels = store.load(mnist_root)["test_labels"]
    assert len(mistakes) == 24
    assert all(m["label"] != m["predicted"] for m in mistakes)
    assert all(labels[m["index"]] == m["label"] for m in mistakes)
    assert [m["probability"] for m in mistakes] == sorted(
        (m["probability"] for m in mistakes), reverse=True
    )
    for name in ("confusion_matrix.png", "mistakes.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG) and len(blob) > 10_000, name


def test_evaluate_under_torchrun_sums_the_shards_and_writes_once(real_run, mnist_root, tmp_path):
    one = json.loads((real_run / "eval" / "eval.json").read_text())
    out = tmp_path / "eval2"
    args = [str(real_run), "--data-root", str(mnist_root), "--out", str(out)]
    proc = run_module("pipeline.evaluate", args, nproc=2)
    assert_ok(proc)
    assert proc.stdout.count("test accuracy:") == 1
    two = json.loads((out / "eval.json").read_text())
    assert two["test_accuracy"] == one["test_accuracy"] and two["test_count"] == 10_000
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-6)  # other batches
    assert two["per_class_accuracy"] == one["per_class_accuracy"]
    assert {m["index"] for m in two["mistakes"]} == {m["index"] for m in one["mistakes"]}


def fake_wandb() -> types.ModuleType:
    """A stand-in for wandb that records what evaluate sends."""
    module = types.ModuleType("wandb")
    module.runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.id, self.url = kwargs, kwargs["id"], ""
            self.rows, self.summary, self.finished = [], {}, False
            module.runs.append(self)

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, row, step=None):
            self.rows.append(row)

        def finish(self, exit_code=0):
            self.finished = True

    module.init = lambda **kwargs: Run(**kwargs)
    module.Settings = lambda **kwargs: kwargs
    module.Image = lambda path: ("image", path)
    module.run = None
    return module


def test_evaluate_sends_the_pictures_to_the_runs_wandb_run(
    real_run, mnist_root, tmp_path, monkeypatch, capsys
):
    state = checkpoint.load(checkpoint.list_checkpoints(real_run)[0])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = checkpoint.save(run_dir, state["global_step"], {**state, "run_id": "abcd1234"}, keep=1)
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert evaluate.main([str(path), "--data-root", str(mnist_root), "--tracking", "offline"]) == 0
    (run,) = wandb.runs
    assert run.id == "abcd1234" and run.kwargs["mode"] == "offline" and run.finished
    (row,) = run.rows
    out = run_dir / f"eval-{path.stem}"  # a checkpoint file: eval-NAME/ beside it
    assert row["eval/confusion_matrix"] == ("image", str(out / "confusion_matrix.png"))
    assert row["eval/mistakes"] == ("image", str(out / "mistakes.png"))
    assert row["eval/test_accuracy"] == json.loads((out / "eval.json").read_text())["test_accuracy"]
    assert "sent to W&B run abcd1234" in capsys.readouterr().out

    # --tracking disabled never starts W&B.
    assert evaluate.main([str(path), "--data-root", str(mnist_root), "--tracking", "disabled"]) == 0
    assert len(wandb.runs) == 1


def readme_code() -> str:
    """The Python blocks of the "Export" section of docs/trained-model.md, joined."""
    text = (REPO / "docs" / "trained-model.md").read_text()
    section = text.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section shows the loading code and the plain LeNet"
    return "\n".join(blocks)


CHILD = """
import sys
sys.modules["pipeline"] = None  # this project cannot be imported here
try:
    import pipeline
except ImportError:
    pass
else:
    sys.exit("pipeline is importable")
import warnings
import torch
warnings.filterwarnings("ignore", message=".*deprecated")
images = torch.load("images.pt", weights_only=True)
code = open("readme.py").read()
namespace = {"images": images}
exec(compile(code, "docs/trained-model.md", "exec"), namespace)
x = namespace["preprocess"](images)
outputs = {
    "exported": namespace["exported"](x),
    "torchscript": namespace["scripted"](x),
    "state_dict": namespace["model"](x),
}
if len(sys.argv) > 1:  # lenet.onnx is there, and onnxruntime
    import onnxruntime
    session = onnxruntime.InferenceSession("lenet.onnx")
    outputs["onnx"] = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
torch.save({"x": x, **{k: v.detach() for k, v in outputs.items()}}, "outputs.pt")
"""


def test_exported_files_run_without_this_project(real_run, mnist_root, tmp_path, capsys):
    """Each format, loaded by the docs' code in a process that cannot import `pipeline`,
    gives the checkpoint's outputs on real test images."""
    work = tmp_path / "user"
    work.mkdir()
    names = {"exported": "lenet.pt2", "torchscript": "lenet.torchscript.pt"}
    names["state_dict"] = "lenet.pt"
    formats = list(names)
    # ONNX is exported with onnx and onnxscript and run here with onnxruntime; without them
    # the other formats are still checked, then the test skips saying so (fails in CI).
    onnx_missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if not onnx_missing:
        formats.append("onnx")
        names["onnx"] = "lenet.onnx"
    for fmt in formats:
        assert export_main([str(real_run), "--format", fmt, "--out", str(work / names[fmt])]) == 0
        assert "the checkpoint's outputs" in capsys.readouterr().out

    images = store.load(mnist_root)["test_images"][:500]
    torch.save(images, work / "images.pt")
    (work / "readme.py").write_text(readme_code())
    child = [sys.executable, "-I", "-c", CHILD, *(["onnx"] if "onnx" in formats else [])]
    proc = subprocess.run(child, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    got = torch.load(work / "outputs.pt", weights_only=True)
    x = normalize_and_pad(images, torch.device("cpu"))
    assert torch.equal(got["x"], x)  # the README's preprocessing is the pipeline's
    from pipeline.trained import loading

    _, _, _, model = loading.load(real_run)
    with torch.no_grad():
        expected = model(x)
    for fmt in formats:
        assert torch.allclose(got[fmt], expected, rtol=0, atol=1e-4), fmt
        assert torch.equal(got[fmt].argmax(1), expected.argmax(1)), fmt
    if onnx_missing:
        require(
            f"the ONNX export was not checked: {', '.join(onnx_missing)} not installed "
            f"(pip install {' '.join(ONNX_PACKAGES)})"
        )


def save_as_a_user_would(images: np.ndarray, out: Path) -> list[Path]:
    """Test digits as files of all kinds: MNIST's light on black; dark on white; enlarged,
    off-centre on a wider RGB page; JPEG; a grey, noisy scan."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, digit in enumerate(images):
        kind, path = i % 5, out / f"digit-{i:03d}.png"
        if kind == 0:
            img = Image.fromarray(digit)
        elif kind == 1:
            img = Image.fromarray(255 - digit)
        elif kind == 2:
            big = Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BICUBIC)
            img = Image.new("RGB", (170, 150), "white")
            img.paste(big.convert("RGB"), (40, 10))
        elif kind == 3:
            big = Image.fromarray(digit).resize((84, 84), Image.Resampling.BICUBIC)
            img = Image.new("L", (100, 120), 0)
            img.paste(big, (3, 30))
            path = path.with_suffix(".jpg")
        else:
            scan = np.kron(210 - digit.astype(np.float32) * (180 / 255), np.ones((2, 2)))
            scan = np.clip(scan + rng.normal(0, 6, scan.shape), 0, 255).astype(np.uint8)
            img = Image.fromarray(scan)
        img.save(path)
        paths.append(path)
    return paths


def test_predict_reads_digits_saved_as_a_user_would(real_run, mnist_root, tmp_path):
    if importlib.util.find_spec("PIL") is None:
        require("predict needs Pillow: pip install -e .[predict]")
    data = store.load(mnist_root)
    images, labels = data["test_images"][:100].numpy(), data["test_labels"][:100].tolist()
    paths = save_as_a_user_would(images, tmp_path)
    proc = run_module("pipeline.predict", [str(real_run), *map(str, paths)])
    assert_ok(proc)
    using, *lines = proc.stdout.splitlines()
    assert using.startswith(f"using {real_run / 'best.pt'} ")
    assert len(lines) == 100
    predicted = {}
    for line in lines:
        m = re.fullmatch(r"(\S+): (\d)   \((.*)\)", line)
        assert m, line
        predicted[m[1]] = int(m[2])
        top = re.findall(r"(\d) +([\d.]+)%", m[3])
        assert len(top) == 3 and float(top[0][1]) >= float(top[1][1]) >= float(top[2][1])
    correct = sum(predicted[str(p)] == y for p, y in zip(paths, labels, strict=True))
    assert correct >= 98, f"{correct} of 100 digits classified correctly"
