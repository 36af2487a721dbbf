"""A checkpoint resumes on another world size (and another train.grad_accum): the same global
batches at the same steps, so the run ends where an uninterrupted one does, up to the order of
float sums; what really changes the run is still refused with one line."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import EXIT_CHECKPOINT

from helpers import TINY_ARGS, assert_ok, final_model, max_diff, run_pipeline

STEPS_PER_EPOCH = 16  # tiny_mnist: 512 images at a global batch of 32
STOP_AT = 12  # mid-epoch 1


def _args(root, run_dir, *extra):
    return [
        *TINY_ARGS,
        f"data.root={root}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "optim.lr=0.1",
        *extra,
    ]


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _run(root, run_dir, nproc, *extra):
    proc = run_pipeline(_args(root, run_dir, *extra), nproc=nproc)
    assert_ok(proc)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tiny_mnist, tmp_path_factory):
    """The whole run on 2 ranks and on 1 (the same run, up to the order of float sums), and a
    control run with another learning rate."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _run(tiny_mnist, tmp / "w2", 2)
    _run(tiny_mnist, tmp / "w1", 1)
    _run(tiny_mnist, tmp / "control", 2, "optim.lr=0.09")
    return tmp


@pytest.mark.parametrize(
    "before, after",
    [((2, "train.grad_accum=1"), (1, "train.grad_accum=2")), ((1, "train.grad_accum=1"), (2,))],
    ids=["2 ranks -> 1 rank x 2 micro-steps", "1 rank -> 2 ranks"],
)
def test_a_checkpoint_resumes_on_another_world_size(
    tiny_mnist, tmp_path, uninterrupted, before, after
):
    run_dir = tmp_path / "run"
    (n0, *extra0), (n1, *extra1) = before, after
    _run(tiny_mnist, run_dir, n0, f"train.max_steps={STOP_AT}", *extra0)
    resumed = _run(tiny_mnist, run_dir, n1, *extra1)
    assert f"global step {STOP_AT})" in resumed.stdout
    assert f"world {n0} -> {n1}" in resumed.stdout

    reference, control = uninterrupted / "w2", uninterrupted / "control"
    other_split = uninterrupted / "w1"
    ours, theirs = _losses(run_dir), _losses(reference)

    def loss_gap(a: dict) -> float:
        return max(abs(a[s] - theirs[s]) for s in ours)

    # The same optimizer steps, and the same samples in each: the losses agree step by step,
    # as closely as an uninterrupted run on another number of ranks does (float sums in
    # another order drift apart over the steps, more on some CPUs than on others).
    assert sorted(ours) == sorted(theirs)
    float_order = loss_gap(_losses(other_split))
    gap, control_gap = loss_gap(ours), loss_gap(_losses(control))
    assert gap <= max(1e-4, 3 * float_order) < control_gap / 10, (gap, float_order, control_gap)
    # The parameters end equal up to float sums in another order; a control run is far off.
    diff = max_diff(final_model(run_dir), final_model(reference))
    float_diff = max_diff(final_model(other_split), final_model(reference))
    control_diff = max_diff(final_model(control), final_model(reference))
    assert diff <= max(1e-4, 3 * float_diff) < control_diff / 10, (diff, float_diff, control_diff)
    # The epoch summary counts every image once across the change.
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in epochs] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_what_changes_the_run_is_still_refused_with_one_line(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    _run(tiny_mnist, run_dir, 2, f"train.max_steps={STOP_AT}")
    proc = run_pipeline(_args(tiny_mnist, run_dir, "train.batch_size=64"), nproc=1)
    assert proc.returncode == EXIT_CHECKPOINT, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "train.batch_size=32" in line and "train.batch_size=64" in line
    assert "Traceback" not in proc.stderr
