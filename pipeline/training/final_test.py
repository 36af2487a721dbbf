"""The one test of a run: the test set's loss and accuracy of the model the run ends with, and
which model that is, for summary.json (`test_accuracy`, `test_loss`, `test_of`, `test_epoch`,
`test_step`).

With checkpoint.keep_best it is best.pt: with a validation split its weights are read from the
file (rank 0 reads it, every rank gets it) and tested, so `python -m pipeline.evaluate RUN_DIR`
reports exactly these numbers; without a split the selected epoch was tested when it ended,
and those are its numbers. Otherwise (or before any whole epoch was judged) it is the last
model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data.sets import EvalSets
from pipeline.dist.group import DistContext
from pipeline.training import checkpoint
from pipeline.training.selection import Selection

log = logging.getLogger(__name__)


def tested(scores: dict, what: str, epoch: int, step: int) -> dict:
    """summary.json's fields of the test: its numbers and which model they are of."""
    which = f"epoch {epoch}" if what == checkpoint.BEST else f"epoch {epoch}, step {step}"
    return {
        "test_accuracy": scores["test_accuracy"],
        "test_loss": scores["test_loss"],
        "test_of": f"{what} ({which})",
        "test_epoch": epoch,
        "test_step": step,
    }


def load_best(ctx: DistContext, run_dir: Path) -> dict | None:
    """best.pt's state on every rank; None, with a warning, where it is missing (a run resumed
    with checkpoint.keep_best turned on after its best epoch). A collective."""
    path = run_dir / checkpoint.BEST
    _, best = checkpoint.load_on_main(ctx, lambda: path if path.is_file() else None)
    if best is None:
        log.warning(f"{path} is missing: the test is of the last model")
    return best


def final_test(
    ctx: DistContext,
    run_dir: Path,
    engine,
    evals: EvalSets,
    selection: Selection,
    last: dict,
    keep_best: bool,
) -> dict:
    """Test the model the run ends with on `engine` (see the module's text; a collective).
    `last` is the last epoch's record."""
    kept = keep_best and selection.best_epoch is not None
    if kept and not evals.has_val:
        s = selection
        return tested(s.best_scores, checkpoint.BEST, s.best_epoch, s.best_step)
    best = load_best(ctx, run_dir) if kept else None
    if best is not None:
        engine.model.load_state_dict(best["model"])
        epoch, step = best["best"]["epoch"], best["best"]["step"]
        return tested(evals.test(engine), checkpoint.BEST, epoch, step)
    scores = evals.test(engine) if evals.has_val else last
    return tested(scores, "the last model", last["epoch"], last["step"])
