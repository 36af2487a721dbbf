"""Weights & Biases for the main rank's tracker: which mode, one run per job, resume by run id.

Everything that knows about wandb lives here, and `import wandb` happens inside functions only,
so `import pipeline` works without wandb installed, and a run that does not ask for W&B
(tracking.mode=disabled, or auto without credentials) never loads it.
`WandbSink.open` raises `WandbUnavailable` with a one-line reason when W&B cannot be used; the
sink turns that into a warning and training goes on with its local files.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config.schema import TrackingConfig, to_dict
from pipeline.errors import describe
from pipeline.tracking.sink import RunStart, Sink
from pipeline.training import checkpoint

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://api.wandb.ai"
# An unreachable server must not hold up start-up for the wandb default of 90 s; the 30 s
# limit can be changed with WANDB_INIT_TIMEOUT (seconds).
INIT_TIMEOUT_S = 30.0
# WANDB_MODE values wandb accepts, as tracking modes ("run" and "dryrun": wandb's older names).
_WANDB_MODES = {"run": "online", "dryrun": "offline"} | {m: m for m in ("online", "offline")}
_WANDB_MODES["disabled"] = "disabled"


class WandbUnavailable(Exception):
    """W&B cannot be used in this process; the message says why in one line."""


class WandbMissing(WandbUnavailable):
    """wandb cannot be imported at all."""


def has_credentials(env: dict[str, str] | None = None) -> bool:
    """Whether a W&B API key is configured: the environment, or a .netrc entry for the host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = Path(env["NETRC"]) if env.get("NETRC") else Path("~/.netrc").expanduser()
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, env: dict[str, str] | None = None) -> str:
    """online, offline or disabled for tracking.mode; auto follows WANDB_MODE, then credentials.

    An explicit tracking.mode wins over WANDB_MODE; with auto, a WANDB_MODE the user exported
    is honoured, and otherwise the run is online when credentials are configured, else W&B is
    off: a user who never set W&B up gets no wandb import, no files and no warning.
    """
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    from_env = _WANDB_MODES.get(env.get("WANDB_MODE", "").strip().lower())
    if from_env:
        return from_env
    return "online" if has_credentials(env) else "disabled"


def new_run_id() -> str:
    """A fresh W&B run id (8 characters of [a-z0-9], like wandb's own)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def agent_run(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(sweep id, run id) when a `wandb agent` started this process, else None. The agent
    owns the run: its id is the one to open (and to keep in checkpoints), not one of ours."""
    env = os.environ if env is None else env
    sweep, run = env.get("WANDB_SWEEP_ID", "").strip(), env.get("WANDB_RUN_ID", "").strip()
    return (sweep, run) if sweep and run else None


def _import_wandb():
    try:
        import wandb
    except Exception as e:  # not installed, or broken: either way not usable
        raise WandbMissing(
            f"wandb cannot be imported ({describe(e, with_type=True)}); pip install -e .[wandb], "
            "or set tracking.mode=disabled"
        ) from e
    return wandb


def init_timeout() -> float:
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
    except ValueError:
        return INIT_TIMEOUT_S


class WandbSink(Sink):
    """The job's W&B run: opened (or continued by run id) at the start, history rows at global
    steps, the summary and the checkpoint artifact at the end. Training opens it with `start`;
    evaluate with `open`, and sends its results with `log_evaluation`.

    While training, a failing call is one warning, after which the run goes on without W&B.
    """

    def __init__(self, run_dir: Path, tracking: TrackingConfig, mode: str):
        self.run_dir, self.tracking, self.mode = run_dir, tracking, mode
        self.run: Any = None
        self.steps_per_epoch, self.first_step = 1, 0

    @property
    def url(self) -> str:
        """The run's page, for an online run."""
        return getattr(self.run, "url", None) or ""

    def open(self, run_id: str, config: dict[str, Any], group: str, mode: str = "") -> None:
        """Start, or continue by `run_id`, a W&B run in `mode` (the sink's by default); its
        files go under run_dir/wandb. Raises WandbUnavailable when wandb is missing or the run
        cannot start (no network, bad key, timeout); the caller decides what to do next."""
        mode, t = mode or self.mode, self.tracking
        wandb = _import_wandb()
        try:
            run = wandb.init(
                mode=mode,
                dir=str(self.run_dir),
                id=run_id,
                resume="allow",
                project=t.project,
                entity=t.entity or None,
                name=t.name or self.run_dir.resolve().name,
                group=group or None,
                job_type="train",
                config=config,
                settings=wandb.Settings(init_timeout=init_timeout(), quiet=True),
            )
            # Epoch metrics are drawn against the epoch, step metrics against the global step.
            run.define_metric("epoch/epoch")
            run.define_metric("epoch/*", step_metric="epoch/epoch")
        except Exception as e:
            _abandon(wandb)
            raise WandbUnavailable(
                f"the {mode} W&B run could not start ({describe(e, with_type=True)})"
            ) from e
        self.run, self.wandb, self.mode, self.run_id = run, wandb, mode, run_id
        # A resumed online run knows the steps it already holds; logging at an older step
        # would only draw a wandb warning per call, so those rows are skipped.
        self.first_step = int(getattr(run, "starting_step", 0) or 0)

    def start(self, run: RunStart) -> None:
        """Open (or, with the checkpoint's run id, continue) the job's W&B run."""
        group, agent = self.tracking.group, agent_run()
        self.run_id = run.run_id
        if agent is not None:
            # A `wandb agent` started this run: the run and its id are the agent's (kept in the
            # checkpoints, so that a requeued point continues it), its group the sweep's.
            sweep, agent_id = agent
            if self.run_id and self.run_id != agent_id:
                log.warning(
                    f"the checkpoint belongs to W&B run {self.run_id}, but the agent started "
                    f"run {agent_id}: logging to the agent's run"
                )
            self.run_id, group = agent_id, group or sweep
        # Otherwise the id is chosen here, not by wandb, so that it is in the first checkpoint
        # even when W&B cannot start now and a later attempt of the job can.
        self.run_id = self.run_id or new_run_id()
        self.steps_per_epoch = max(1, run.meta["steps_per_epoch"])
        config = {**to_dict(run.cfg), "meta": {k: v for k, v in run.meta.items() if v is not None}}
        off = f"training goes on, results stay in {self.run_dir}"
        try:
            self.open(self.run_id, config, group)
        except WandbUnavailable as e:
            if self.mode != "online" or isinstance(e, WandbMissing):
                log.warning(f"W&B logging is off: {e}; {off}")
                return
            # Online failed (no network, bad key, timeout): keep the metrics in an offline
            # run that `wandb sync` uploads later.
            try:
                self.open(self.run_id, config, group, "offline")
            except WandbUnavailable as e2:
                log.warning(f"W&B logging is off: {e}, and offline too ({e2}); {off}")
                return
            log.warning(f"{e}; logging offline instead: {self._sync_hint()}")
        if self.mode == "online":
            log.info(f"W&B run {self.run_id}: {self.url}")
        else:
            log.info(f"W&B offline run {self.run_id}: {self._sync_hint()}")

    def _sync_hint(self) -> str:
        return f"upload it with `wandb sync {self.run_dir}/wandb/offline-run-*`"

    def _send(self, what: str, call: Callable[[Any], object]) -> None:
        """`call` the open run; on the first failure warn once and go on without W&B."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as e:
            self.run = None
            log.warning(
                f"W&B logging stopped: {what} failed ({describe(e, with_type=True)}); "
                f"training goes on, results stay in {self.run_dir}"
            )

    def _log(self, what: str, row: dict[str, Any], step: int) -> None:
        if step >= self.first_step:
            self._send(what, lambda run: run.log(row, step=step))

    def log_step(self, r: dict) -> None:
        """One history row per step record, as in steps.jsonl."""
        row = {
            "train/loss": r["loss"],
            "train/lr": r["lr"],
            "train/images_per_s": r["images_per_s"],
            "train/epoch": r["epoch"] - 1 + r["step_in_epoch"] / self.steps_per_epoch,
        }
        self._log("logging step metrics", row, r["step"])

    def log_epoch(self, record: dict) -> None:
        skip = ("step", "test_count", "val_count", "dataset")  # the dataset: in the config
        row = {f"epoch/{k}": v for k, v in record.items() if k not in skip}
        self._log("logging epoch metrics", row, record["step"])

    def finish(self, summary: dict, line: str) -> None:
        """The summary and, with tracking.artifact, the selected checkpoint (best.pt, else the
        newest); then the run is finished."""
        self._send("writing the summary", lambda run: run.summary.update(summary))
        if self.tracking.artifact:
            best = self.run_dir / checkpoint.BEST
            found = [best] if best.is_file() else checkpoint.list_checkpoints(self.run_dir)
            if found:
                self._send(
                    "logging the checkpoint artifact",
                    lambda run: self._artifact(run, found[0], summary),
                )
        self.close()

    def _artifact(self, run: Any, path: Path, metadata: dict[str, Any]) -> None:
        artifact = self.wandb.Artifact(f"lenet-{run.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact, aliases=["latest", f"step-{metadata.get('global_step')}"])

    def close(self, exit_code: int = 0) -> None:
        self._send("finishing the run", lambda run: run.finish(exit_code=exit_code))
        self.run = None

    def log_evaluation(self, results: dict[str, Any], pictures: dict[str, Path]) -> None:
        """evaluate's test loss and accuracy and its pictures as one row, the accuracy in the
        summary; then the run is finished. Raises what wandb raises."""
        # No step: a finished run's steps are all taken, the row goes after them.
        self.run.log(
            {
                "eval/test_accuracy": results["test_accuracy"],
                "eval/test_loss": results["test_loss"],
                **{f"eval/{k}": self.wandb.Image(str(v)) for k, v in pictures.items()},
            }
        )
        self.run.summary.update({"eval/test_accuracy": results["test_accuracy"]})
        self.run.finish(exit_code=0)


def _abandon(wandb: Any) -> None:
    """Close what a failed wandb.init left open, so that a retry with the same id can start.

    The wandb service keeps the id of a run that failed to start; stopping the service lets an
    offline run with that id begin.
    """
    try:
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        teardown = getattr(wandb, "teardown", None)
        if teardown is not None:
            teardown()
    except Exception:
        pass
