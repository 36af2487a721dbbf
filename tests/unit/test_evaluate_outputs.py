"""Where evaluate writes, in this process on the tiny dataset: a run directory's best.pt into
RUN_DIR/eval/, --last and a checkpoint file into eval-NAME/ beside the checkpoint; no evaluation
overwrites another's files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import evaluate
from pipeline.config.schema import load_config, to_dict
from pipeline.model import LeNet
from pipeline.training import checkpoint

FILES = {"eval.json", "confusion_matrix.json", "confusion_matrix.png", "mistakes.png"}


def test_best_last_and_a_file_each_write_their_own_folder(tmp_path, tiny_mnist, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = to_dict(load_config(None, ["train.fused_conv=false"]))
    for step in (1, 2):
        torch.manual_seed(step)
        state = {"model": LeNet().state_dict(), "config": config, "global_step": step}
        checkpoint.save(run_dir, step, state, keep=3)
    best = {"epoch": 1, "step": 1, "metric": "val_accuracy", "value": 0.1}
    checkpoint.save_best(run_dir, checkpoint.load(run_dir / checkpoint.checkpoint_name(1)), best)

    def evaluated(*argv: str) -> dict:
        args = [*argv, "--data-root", str(tiny_mnist), "--tracking", "disabled"]
        assert evaluate.main(args) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("wrote ")]
        out = Path(line.rsplit(" in ", 1)[1])
        assert {p.name for p in out.iterdir()} >= FILES, out
        return {"out": out, **json.loads((out / "eval.json").read_text())}

    first = evaluated(str(run_dir))
    last = evaluated(str(run_dir), "--last")
    assert first["out"] == run_dir / "eval" and first["global_step"] == 1
    assert first["checkpoint"] == str(run_dir / "best.pt")
    assert last["out"] == run_dir / "eval-ckpt-000000002" and last["global_step"] == 2
    # Neither overwrote the other.
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["global_step"] == 1

    older = evaluated(str(run_dir / checkpoint.checkpoint_name(1)))
    assert older["out"] == run_dir / "eval-ckpt-000000001" and older["global_step"] == 1
    assert evaluated(str(run_dir / "best.pt"))["out"] == run_dir / "eval"
