"""The validation split on real gloo ranks: no rank ever trains on a held-out image, on 1 and 2
ranks and across a resume on another world size, and all of them record the same split.

The images are told apart by the index `split_data.write_indexed_mnist` writes into each of
them; `recording_train.py` reads the indices back from the batches each rank's optimizer steps
receive. (The split in this process: tests/unit/test_validation_split.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from split_data import write_indexed_mnist

from pipeline.data.split import split
from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, child_env

N, VAL, BATCH = 512, 96, 32  # 416 images kept: 13 steps of 32 per epoch, on 1 or 2 ranks
HELD_OUT = set(split(N, VAL).val.tolist())
KEPT = set(split(N, VAL).train.tolist())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    return write_indexed_mnist(tmp_path_factory.mktemp("indexed"), n_train=N)


def recorded_run(data: Path, run_dir: Path, nproc: int, *extra: str) -> Path:
    """Train on `data` with `nproc` ranks; the folder of each rank's recorded steps (one per
    command)."""
    record = run_dir.parent / f"{run_dir.name}-steps-{len(list(run_dir.parent.glob('*-steps-*')))}"
    script = str(REPO / "tests" / "recording_train.py")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = [*TINY_ARGS, f"data.root={data}", f"train.run_dir={run_dir}", "train.epochs=2"]
    args += [f"data.val_size={VAL}", f"train.batch_size={BATCH}", *extra]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), script, *args]
    env = child_env({"RECORD_DIR": str(record)})
    assert_ok(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    return record


def steps(record: Path) -> dict[int, dict[int, list[int]]]:
    """{global step: {rank: indices}} of every recorded step."""
    out: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for path in sorted(record.glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[r["step"]][rank] = r["indices"]
    return dict(out)


def global_batches(record: Path) -> dict[int, list[int]]:
    return {
        s: sorted(i for part in ranks.values() for i in part) for s, ranks in steps(record).items()
    }


def assert_trains_on_the_kept_images_only(record: Path) -> None:
    by_step = steps(record)
    assert sorted(by_step) == list(range(1, 27))  # 2 epochs of 13 steps
    for epoch in (1, 2):
        seen = [
            i for s in range(13 * epoch - 12, 13 * epoch + 1) for i in global_batches(record)[s]
        ]
        assert not set(seen) & HELD_OUT
        assert sorted(seen) == sorted(KEPT)  # every kept image once per epoch


@pytest.fixture(scope="module")
def one_and_two_ranks(indexed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    return {n: (tmp / f"world{n}", recorded_run(indexed, tmp / f"world{n}", n)) for n in (1, 2)}


def test_no_rank_trains_on_a_held_out_image(one_and_two_ranks):
    for _, record in one_and_two_ranks.values():
        assert_trains_on_the_kept_images_only(record)
    two = steps(one_and_two_ranks[2][1])
    for ranks in two.values():  # the ranks split each global batch between them
        assert len(ranks[0]) == len(ranks[1]) == BATCH // 2 and not set(ranks[0]) & set(ranks[1])
    # The same global batch at every step, whatever the world size.
    one, two = (global_batches(one_and_two_ranks[n][1]) for n in (1, 2))
    assert one == two


def test_every_world_size_records_the_same_split(one_and_two_ranks):
    expected = split(N, VAL).record()
    for run_dir, _ in one_and_two_ranks.values():
        assert json.loads((run_dir / "split.json").read_text()) == expected
        assert checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["split"] == expected


def test_a_resume_on_another_world_size_keeps_the_split(indexed, one_and_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    first = recorded_run(indexed, run_dir, 2, "train.max_steps=5")
    second = recorded_run(indexed, run_dir, 1)
    assert sorted(steps(first)) == [1, 2, 3, 4, 5] and min(steps(second)) == 6
    record = tmp_path / "both"
    record.mkdir()
    lines = [p.read_text() for p in (first / "rank0.jsonl", second / "rank0.jsonl")]
    (record / "rank0.jsonl").write_text("".join(lines))
    (record / "rank1.jsonl").write_text((first / "rank1.jsonl").read_text())
    assert_trains_on_the_kept_images_only(record)
    assert global_batches(record) == global_batches(one_and_two_ranks[1][1])
    assert json.loads((run_dir / "split.json").read_text()) == split(N, VAL).record()
