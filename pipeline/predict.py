"""`python -m pipeline.predict RUN_DIR|CKPT IMAGE...` (`lenet-predict`): classify your own digit
images with a trained model; each image is first made to look like an MNIST digit
(`pipeline.trained.digits`). Reading images needs Pillow (the project's `predict` extra)."""

from __future__ import annotations

from pathlib import Path

from pipeline import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(
        "pipeline.predict",
        "Classify digit images (PNG, JPEG, ...) with a trained model: a dark digit on a light "
        "background or a light one on dark, any size.",
    )
    cli.add_target_arguments(parser)
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="digit images")
    parser.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument(
        "--save-input", type=Path, metavar="DIR", help="also write each 28x28 image the model sees"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.top <= 10:
        parser.error("--top must be between 1 and 10")

    def body() -> int:
        import torch  # only for a run, not for --help

        from pipeline.trained import loading
        from pipeline.trained.digits import import_pil, prepare, save_inputs

        import_pil()  # before the checkpoint: a missing Pillow is one line, at once
        x = prepare(args.images)
        _, _, _, model = loading.load(args.target, args.last)
        with torch.no_grad():
            probabilities = model(x).softmax(1)
        p, classes = probabilities.topk(args.top, dim=1)
        for image, ps, cs in zip(args.images, p.tolist(), classes.tolist(), strict=True):
            shown = "  ".join(f"{c} {q * 100:5.1f}%" for c, q in zip(cs, ps, strict=True))
            print(f"{image}: {cs[0]}   ({shown})")
        if args.save_input:
            save_inputs(x, args.images, args.save_input)
        return 0

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
