"""JSON-lines files: the records a run appends (steps.jsonl, metrics.jsonl), read back by the
report, the comparison and evaluate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pipeline.atomic import write_atomic


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, in order; a missing file has none, and a line that
    does not parse as an object (one cut short by a kill) is skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """Add one record as a line to a JSON-lines file."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep only the records of a JSON-lines file that `keep` accepts (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    kept = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r))
    write_atomic(path, kept)
