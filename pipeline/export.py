"""`python -m pipeline.export RUN_DIR|CKPT --format FORMAT [--out FILE]` (`lenet-export`): a
trained model as a file that loads and runs without this project (state_dict, TorchScript,
torch.export or ONNX). The work is `pipeline.trained.formats`."""

from __future__ import annotations

from pathlib import Path

from pipeline import cli
from pipeline.trained import loading
from pipeline.trained.formats import SUFFIXES, export


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(
        "pipeline.export",
        "Write a trained model to a file that loads and runs without this project.",
    )
    loading.add_target_arguments(parser)
    parser.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="file format")
    parser.add_argument(
        "--out", type=Path, help="the file to write (default: lenet-STEP.* beside the checkpoint)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        export(args.target, args.format, args.out, args.last)
        return 0

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
