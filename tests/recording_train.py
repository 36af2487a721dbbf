"""The training command, recording which training images each rank's optimizer steps receive:
`RECORD_DIR=DIR python tests/recording_train.py [TRAIN ARGS]`, alone or under torchrun.

For a dataset of `split_data.write_indexed_mnist`, whose images carry their own index: each rank
appends one line per optimizer step to DIR/rank<R>.jsonl, `{"step", "epoch", "indices"}`, the
indices of the images of that step's micro-batches. The product carries no test switch: the
Trainer's own `step` is wrapped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from split_data import decode_indices

from pipeline import train
from pipeline.training.trainer import Trainer


def install(out: Path) -> None:
    step = Trainer.step

    def recording_step(self: Trainer, micro_batches) -> None:
        batches = [next(micro_batches) for _ in range(self.cfg.train.grad_accum)]
        record = {
            "step": self.state.global_step + 1,
            "epoch": self.state.epoch + 1,
            "indices": [i for x, _ in batches for i in decode_indices(x)],
        }
        with open(out / f"rank{self.ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        step(self, iter(batches))

    Trainer.step = recording_step


if __name__ == "__main__":
    out = Path(os.environ["RECORD_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    install(out)
    raise SystemExit(train.main(sys.argv[1:]))
