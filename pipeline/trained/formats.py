"""A trained model as a file that runs without this project (what `python -m pipeline.export`
writes).

- `state_dict`: the model's weights, `torch.save`d; build the network with the few lines of plain
  PyTorch in the README ("Use the trained model") and `load_state_dict` them.
- `torchscript`: `torch.jit.load(FILE)`; a traced module (torch marks TorchScript as deprecated;
  it still loads).
- `exported`: `torch.export.load(FILE).module()`; torch.export's program, any batch size.
- `onnx`: for ONNX runtimes; needs the onnx and onnxscript packages.

Every format takes what training feeds the model, float32 [N, 1, 32, 32] (MNIST images scaled to
[0, 1], normalised with mean 0.1307 and std 0.3081, padded by 2 with the normalised black), and
gives [N, 10] logits. The file is loaded back and checked against the checkpoint's model before
it is written (whole or not at all).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.atomic import write_atomic
from pipeline.errors import PipelineError, describe
from pipeline.model import LeNet
from pipeline.trained import loading

TOLERANCE = 1e-4  # largest difference of logits accepted between the file and the checkpoint


def encode(model: LeNet, fmt: str) -> bytes:
    """The bytes of `model` as a file of format `fmt`."""
    example = torch.zeros(2, 1, 32, 32)
    batch = torch.export.Dim("batch")
    buf = io.BytesIO()
    if fmt == "state_dict":
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buf)
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated")  # the README says so once
            torch.jit.save(torch.jit.trace(model, example), buf)
    elif fmt == "exported":
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, buf)
    else:
        for package in ("onnx", "onnxscript"):
            try:
                __import__(package)
            except ImportError as e:
                raise PipelineError(
                    f"--format onnx needs the {package} package (the project's onnx extra): "
                    "pip install onnx onnxscript"
                ) from e
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
            verbose=False,
        )
        return program.model_proto.SerializeToString()
    return buf.getvalue()


def decode(fmt: str, blob: bytes, variant: dict) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The exported file loaded back, as a function from inputs to logits (None: an ONNX file
    where onnxruntime is missing, which is only checked as a graph)."""
    if fmt == "state_dict":
        model = LeNet(**variant)
        model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
        return model.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated")
            return torch.jit.load(io.BytesIO(blob))
    if fmt == "exported":
        return torch.export.load(io.BytesIO(blob)).module()
    import onnx

    onnx.checker.check_model(onnx.load_from_string(blob))
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@torch.no_grad()
def check(model: nn.Module, run: Callable | None, fmt: str) -> str:
    """Compare the exported file's outputs with the model's on random inputs of a few sizes."""
    if run is None:
        return "checked the ONNX graph (install onnxruntime to compare its outputs too)"
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in (1, 7, 64):
        x = torch.randn(n, 1, 32, 32, generator=g)
        worst = max(worst, (run(x) - model(x)).abs().max().item())
    if worst > TOLERANCE:
        raise PipelineError(
            f"the {fmt} file's outputs differ from the checkpoint's model by {worst:.3g}; "
            "try another --format, and report this"
        )
    return f"loaded it back: the checkpoint's outputs (largest difference {worst:.2g})"


def export(target: Path, fmt: str, suffix: str, out: Path | None, last: bool = False) -> Path:
    """Write the model of `target` (run directory or checkpoint) as `fmt` to `out` (default:
    lenet-STEP`suffix` beside the checkpoint), checked."""
    path, state, cfg, model = loading.load(target, last)
    variant = {"kernel_size": cfg.model.kernel_size, "fc1_width": cfg.model.fc1_width}
    out = out or path.parent / f"lenet-{state.get('global_step', 0)}{suffix}"
    try:
        blob = encode(model, fmt)
        run = decode(fmt, blob, variant)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(
            f"torch could not export the model as {fmt} ({describe(e, with_type=True)}); "
            "try another --format"
        ) from e
    message = check(model, run, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, blob)
    print(f"exported {path} as {fmt} to {out}")
    print(message)
    print(
        f"model: LeNet({variant['kernel_size']}, {variant['fc1_width']}); input: float32 "
        "[N, 1, 32, 32], normalised as in training; output: [N, 10] logits"
    )
    return out
