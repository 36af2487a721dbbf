"""Model selection and early stopping: which epoch is the best, and when to stop.

Every epoch's evaluation is judged on one metric, `checkpoint.select`: `val_accuracy` (the
default) or `val_loss`, on the validation split (`data.val_size`). Without a split there is
nothing else to judge on, so the test set's counterpart (`test_accuracy`, `test_loss`) is used
as before, and the summary says the model was selected on the test set (`selection_split`).

An epoch improves when it beats the best so far by more than `train.early_stop_min_delta` (in
the metric's units; the first epoch always improves, a tie does not). After
`train.early_stop_patience` epochs in a row without an improvement the run stops (0: never).
Only whole epochs are judged, each once: an epoch cut short by train.max_steps is evaluated and
logged, but a resumed run finishes it and judges it then, as an uninterrupted run does.

`propose` only judges; `accept` records. Between the two the trainer agrees on the proposal
across ranks (`dist.any_rank`), so that every rank takes the same branch at the same epoch
(write best.pt, stop). The metric is an all-reduced evaluation, the same on every rank, so the
agreement never changes a decision; it makes sure no rank can wait in a collective that another
skipped. The state is part of every checkpoint (`state_dict`): a resumed run selects and stops
at the epoch an uninterrupted one does.

`final_test` is the one test of a run, of the model it ends with, for summary.json (`test_*`).
With checkpoint.keep_best it is best.pt: with a validation split its weights are read from the
file and tested, so `python -m pipeline.evaluate RUN_DIR` reports exactly these numbers; without
a split the selected epoch was tested when it ended. Otherwise (or before any whole epoch was
judged) it is the last model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.config.schema import Config
from pipeline.data.sets import EvalSets
from pipeline.results.records import metric_text, percent
from pipeline.training.checkpoint import BEST, Checkpoints

# The numbers of an epoch's record that the selected epoch keeps (those it has).
SCORES = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


@dataclass
class Selection:
    metric: str  # the key of an epoch record: val_accuracy, val_loss, test_accuracy, test_loss
    patience: int = 0
    min_delta: float = 0.0
    best_epoch: int | None = None
    best_step: int | None = None
    best_value: float | None = None
    best_scores: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # epochs in a row without an improvement
    stopped: bool = False  # early stopping ended the run
    judged: int = 0  # the last epoch judged

    @classmethod
    def from_config(cls, cfg: Config) -> Selection:
        metric = cfg.checkpoint.select
        if cfg.data.val_size == 0:
            metric = metric.replace("val_", "test_")
        t = cfg.train
        return cls(metric, t.early_stop_patience, t.early_stop_min_delta)

    @property
    def split(self) -> str:
        """The split the metric is measured on: val, or test (no validation split)."""
        return self.metric.partition("_")[0]

    @property
    def higher_is_better(self) -> bool:
        return self.metric.endswith("accuracy")

    def improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.higher_is_better:
            return value - self.best_value > self.min_delta
        return self.best_value - value > self.min_delta

    def propose(self, record: dict) -> tuple[bool, bool]:
        """(improved, stop) for the epoch `record`, without recording it."""
        improved = self.improves(record[self.metric])
        stop = not improved and 0 < self.patience <= self.bad_epochs + 1
        return improved, stop

    def due(self, epoch: int) -> bool:
        """Whether epoch `epoch` (whole) is still to be judged."""
        return epoch > self.judged

    def accept(self, record: dict, improved: bool, stop: bool) -> None:
        """Record the epoch with the decision the ranks agreed on."""
        self.judged = record["epoch"]
        if improved:
            self.best_epoch, self.best_step = record["epoch"], record["step"]
            self.best_value = record[self.metric]
            self.best_scores = {k: record[k] for k in SCORES if k in record}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.stopped = stop

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        kept = {f.name for f in dataclasses.fields(self)} - {"metric", "patience", "min_delta"}
        for name in kept:  # the settings are this run's (a resume insists they match)
            setattr(self, name, state[name])

    def final_test(self, engine, evals: EvalSets, last: dict, best: Checkpoints | None) -> dict:
        """Test the model the run ends with on `engine` (see the module's text; a collective),
        `last` the last epoch's record, `best` None where checkpoint.keep_best is off."""
        if best is not None and self.best_epoch is not None:
            if not evals.has_val:
                return tested(self.best_scores, BEST, self.best_epoch, self.best_step)
            state = best.load_best()
            if state is not None:
                engine.model.load_state_dict(state["model"])
                epoch, step = state["best"]["epoch"], state["best"]["step"]
                return tested(evals.test(engine), BEST, epoch, step)
        scores = evals.test(engine) if evals.has_val else last
        return tested(scores, "the last model", last["epoch"], last["step"])

    def summary(self) -> dict:
        """The selection's fields of summary.json."""
        return {
            "selection_metric": self.metric,
            "selection_split": self.split,
            "selected_epoch": self.best_epoch,
            "selected_step": self.best_step,
            "selected_value": self.best_value,
            "val_loss": self.best_scores.get("val_loss"),
            "val_accuracy": self.best_scores.get("val_accuracy"),
            "epochs_without_improvement": self.bad_epochs,
        }


def tested(scores: dict, what: str, epoch: int, step: int) -> dict:
    """summary.json's fields of the test: its numbers and which model they are of."""
    which = f"epoch {epoch}" if what == BEST else f"epoch {epoch}, step {step}"
    return {
        "test_accuracy": scores["test_accuracy"],
        "test_loss": scores["test_loss"],
        "test_of": f"{what} ({which})",
        "test_epoch": epoch,
        "test_step": step,
    }


def closing_line(summary: dict, patience: int, min_delta: float) -> str:
    """The last line of a run: why it ended, the epoch it selected, and the test accuracy of
    the model it tested (from summary.json's fields)."""
    metric, epoch = summary["selection_metric"], summary["selected_epoch"]
    how = {
        "early_stop": f"stopped early after epoch {summary['epochs']}: {metric} did not improve "
        f"by more than {min_delta:g} for {patience} epoch(s)",
        "max_steps": f"stopped at train.max_steps (epoch {summary['epochs']}, step "
        f"{summary['global_step']})",
    }.get(summary["stop_reason"], f"finished {summary['epochs']} epoch(s)")
    chosen = f"selected epoch {epoch} ({metric} {metric_text(metric, summary['selected_value'])})"
    if epoch is None:
        chosen = "no whole epoch to select from"
    elif summary["selection_split"] == "test":
        chosen += " on the test set: no validation split (data.val_size=0)"
    tested = (
        f"test accuracy of {summary['test_of']}: {percent(summary['test_accuracy'])} "
        f"(test loss {summary['test_loss']:.4f})"
    )
    return f"{how}; {chosen}; {tested}"
