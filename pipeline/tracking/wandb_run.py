"""Weights & Biases for the main rank's tracker: which mode, one run per job, resume by run id.

Everything that knows about wandb lives here, and `import wandb` happens inside functions only,
so `import pipeline` works without wandb installed, and a run that does not ask for W&B
(tracking.mode=disabled, or auto without credentials) never loads it.
`open_run` raises `WandbUnavailable` with a one-line reason when W&B cannot be used; the tracker
turns that into a warning and training goes on with its local files.
"""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import describe

DEFAULT_HOST = "https://api.wandb.ai"
# An unreachable server must not hold up start-up for the wandb default of 90 s; the 30 s
# limit can be changed with WANDB_INIT_TIMEOUT (seconds).
INIT_TIMEOUT_S = 30.0
# WANDB_MODE values wandb accepts, as tracking modes.
_WANDB_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


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


class WandbRun:
    """One open W&B run: history rows at global steps, summary, artifact, finish."""

    def __init__(self, run: Any, wandb: Any, mode: str):
        self.run, self.wandb, self.mode = run, wandb, mode
        # A resumed online run knows the steps it already holds; logging at an older step
        # would only draw a wandb warning per call, so those rows are skipped.
        self.first_step = int(getattr(run, "starting_step", 0) or 0)

    @property
    def url(self) -> str:
        """The run's page, for an online run."""
        return getattr(self.run, "url", None) or ""

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step >= self.first_step:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def log_checkpoint(self, path: Path, metadata: dict[str, Any]) -> None:
        artifact = self.wandb.Artifact(f"lenet-{self.run.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["latest", f"step-{metadata.get('global_step')}"])

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def open_run(
    mode: str,
    run_dir: Path,
    run_id: str,
    project: str,
    entity: str,
    name: str,
    config: dict[str, Any],
    group: str = "",
) -> WandbRun:
    """Start, or continue by `run_id`, the job's W&B run; files go under `run_dir`/wandb.

    Raises WandbUnavailable when wandb is missing or the run cannot start (no network, bad
    key, timeout); the caller decides what to do next.
    """
    wandb = _import_wandb()
    try:
        run = wandb.init(
            mode=mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            project=project,
            entity=entity or None,
            name=name or run_dir.resolve().name,
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
    return WandbRun(run, wandb, mode)


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
