"""`python -m pipeline.export RUN_DIR|CKPT --format FORMAT [--out FILE]` (`lenet-export`): a
trained model as a file that loads and runs without this project (state_dict, TorchScript,
torch.export or ONNX). The work is `pipeline.trained.formats`."""

from __future__ import annotations

from pathlib import Path

from pipeline import cli

# Each --format (`pipeline.trained.formats` writes them) and its file's suffix.
SUFFIXES = {
    "state_dict": ".pt",
    "torchscript": ".torchscript.pt",
    "exported": ".pt2",
    "onnx": ".onnx",
}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(
        "pipeline.export",
        "Write a trained model to a file that loads and runs without this project.",
    )
    cli.add_target_arguments(parser)
    parser.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="file format")
    parser.add_argument(
        "--out", type=Path, help="the file to write (default: lenet-STEP.* beside the checkpoint)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from pipeline.trained.formats import export  # torch: only for a run, not for --help

        export(args.target, args.format, SUFFIXES[args.format], args.out, args.last)
        return 0

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
