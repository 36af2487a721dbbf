"""The benchmark's results: medians over repeats, ratios against the baseline, the table.

`pipeline.bench` measures; this turns its records into the JSON fields and the markdown table
(with the machine, versions and command) that it prints and writes.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from pipeline.results.records import percent
from pipeline.speed import kernels

THRESHOLDS = ("98%", "99%")  # test accuracies whose train time is reported
# x86 vector instruction sets by the /proc/cpuinfo flags they need, widest first.
_ISAS = (
    ("AVX512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ("AVX2", {"avx2", "fma"}),
)


def aggregate(runs: list[dict]) -> dict:
    """One record per case: the median of each timing over the runs, the mean test accuracy of
    each epoch and each evaluation over them (one seed gives the same accuracy in every repeat
    on CPU; several seeds give the mean over seeds), and the train time to each mark read on
    that mean: the median time, compilation and warm-up excluded, to the first evaluation whose
    mean reaches it. `first_step_s_runs` keeps every run's first step, in order: the first run
    compiled with the benchmark's empty compile cache."""
    r = dict(runs[0])
    med, mean = statistics.median, statistics.fmean
    for key in ("images_per_s", "train_s", "first_step_s", "warmup_s", "wall_s", "other_load"):
        r[key] = med(x[key] for x in runs)
    epochs, evals = range(len(r["epoch_s"])), range(len(r["eval_s"]))
    r["epoch_s"] = [med(x["epoch_s"][i] for x in runs) for i in epochs]
    r["epoch_end_s"] = [med(x["epoch_end_s"][i] for x in runs) for i in epochs]
    r["accuracy"] = [mean(x["accuracy"][i] for x in runs) for i in epochs]
    r["eval_s"] = [med(x["eval_s"][i] for x in runs) for i in evals]
    r["eval_accuracy"] = [mean(x["eval_accuracy"][i] for x in runs) for i in evals]
    r["time_to"] = {}
    for mark in THRESHOLDS:
        reached = [i for i in evals if r["eval_accuracy"][i] >= float(mark[:-1]) / 100]
        r["time_to"][mark] = r["eval_s"][reached[0]] if reached else None
    r["seeds"] = sorted({x["seed"] for x in runs})
    r["first_step_s_runs"] = [x["first_step_s"] for x in runs]
    r["images_per_s_runs"] = [x["images_per_s"] for x in runs]
    r["other_load_runs"] = [x["other_load"] for x in runs]
    return r


def _baseline_for(r: dict, records: list[dict]) -> dict | None:
    """The baseline of the same config and world size, else of the same config."""
    same = [b for b in records if b["kind"] == "baseline" and b["config"] == r["config"]]
    return ([b for b in same if b["world"] == r["world"]] or same or [None])[0]


def summarize(records: list[dict]) -> list[dict]:
    """Ratios against the baseline. With repeats, `speedup` is the median of the per-round
    ratios: a pipeline run and its baseline of the same round ran minutes apart, so a slow
    spell of the machine that lasts longer than a round cancels out of their ratio."""
    for r in records:
        b = _baseline_for(r, records) if r["kind"] == "pipeline" else None
        r["baseline"] = b["name"] if b else None
        r["speedup_runs"] = (
            [p / q for p, q in zip(r["images_per_s_runs"], b["images_per_s_runs"], strict=True)]
            if b
            else []
        )
        r["speedup"] = statistics.median(r["speedup_runs"]) if b else None
        both = b and r["time_to"]["99%"] and b["time_to"]["99%"]
        r["time_to_99_speedup"] = b["time_to"]["99%"] / r["time_to"]["99%"] if both else None
        ops = _torch_ops_for(r, records)
        r["vs_torch_ops_runs"] = (
            [p / q for p, q in zip(r["images_per_s_runs"], ops["images_per_s_runs"], strict=True)]
            if ops
            else []
        )
        r["vs_torch_ops"] = statistics.median(r["vs_torch_ops_runs"]) if ops else None
    return records


def _torch_ops_for(r: dict, records: list[dict]) -> dict | None:
    """For a pipeline case with no overrides that trained on the fused kernels: the case of the
    same config and world size on torch's ops (`train.fused_conv=false`), if one ran."""
    if r["kind"] != "pipeline" or r.get("overrides") or r.get("conv") != "fused kernels":
        return None
    same = [
        o
        for o in records
        if o["kind"] == "pipeline"
        and o["config"] == r["config"]
        and o["world"] == r["world"]
        and o["overrides"] == ["train.fused_conv=false"]
    ]
    return same[0] if same else None


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in x]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        **instruction_sets(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    if device == "cuda":
        info.update(gpu=f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
        info.update(cuda=torch.version.cuda)
    return info


def instruction_sets() -> dict:
    """The CPU's widest vector instruction set (by /proc/cpuinfo, where there is one), the one
    torch runs (ATEN_CPU_CAPABILITY can hold it lower) and the fused kernels' build for it."""
    cpu_isa = "unknown"
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = set(next((x for x in lines if x.startswith("flags")), "").split())
        cpu_isa = next((isa for isa, need in _ISAS if need <= flags), "DEFAULT")
    return {
        "cpu_isa": cpu_isa,
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "kernels_variant": kernels.cpu_variant(),
    }


def fmt_s(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _x_runs(r: dict) -> str:
    """The median ratio, and its range over the rounds when there were several."""
    runs = r.get("speedup_runs") or []
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return _x(r["speedup"]) + spread


def headlines(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        conv_only = r["overrides"] in (["train.fused_conv=false"], ["train.fused_conv=true"])
        if r["speedup"] and r["config"].endswith("/cpu.yaml") and (conv_only or not r["overrides"]):
            lines.append(
                f"- {r['config']}, {r['world']} process(es), convs as {r.get('conv', '-')}: "
                f"{r['images_per_s']:,.0f} img/s, {_x_runs(r)} the baseline's (both fp32 "
                f"eager, batch {r['batch_size']})."
            )
    for r in records:
        runs = r.get("vs_torch_ops_runs") or []
        if runs:
            spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
            lines.append(
                f"- {r['config']}, {r['world']} process(es), as configured "
                f"({r.get('conv_path') or _conv(r)}): {_x(r['vs_torch_ops'])}{spread} the img/s "
                f"of the same config on torch's ops (train.fused_conv=false), median of the "
                f"per-round ratios."
            )
    reached = [r for r in records if r["kind"] == "pipeline" and r["time_to"]["99%"]]
    if reached:
        best = min(reached, key=lambda r: r["time_to"]["99%"])
        than = (
            f"{_x(best['time_to_99_speedup'])} faster than the baseline of its config"
            if best["time_to_99_speedup"]
            else "the baseline of its config did not reach 99%"
        )
        lines.append(
            f"- Fastest to 99% test accuracy: {best['name']}, {best['time_to']['99%']:.3f} s of "
            f"training ({than})."
        )
    return lines


def _rounds(result: dict) -> str:
    seeds = result.get("seeds") or []
    times = f"{result['repeat']} time(s)"
    if len(seeds) > 1:
        return f"with seeds {seeds[0]}-{seeds[-1]}, {times} each"
    return times


def _accuracy_note(result: dict) -> str:
    return ", accuracies the means over seeds" if len(result.get("seeds") or []) > 1 else ""


def _kernel_note(result: dict) -> list[str]:
    if result.get("kernel_load_s") is None:
        return []
    if result.get("kernel_problem"):
        return [f"- **conv**: the fused kernels could not be built: {result['kernel_problem']}."]
    return [
        "- **conv**: `fused kernels`: each conv, its max-pool and ReLU as one C++ kernel "
        "(pipeline/speed/kernels.py), built once per machine (about 20 s) and cached; here they "
        "were "
        f"ready {result['kernel_load_s']:.1f} s after the benchmark started, before any case "
        "ran, and each case loads them outside its train time. `torch ops`: torch's three ops "
        "a stage."
    ]


def _isa_note(m: dict) -> str:
    if "torch_isa" not in m:
        return ""
    held = m.get("aten_cpu_capability")
    held = f", held there by ATEN_CPU_CAPABILITY={held}" if held else ""
    return (
        f"Instruction set: the CPU's {m['cpu_isa']}, torch's {m['torch_isa']}{held}; the fused "
        f"kernels' {m['kernels_variant']} build. "
    )


def _first_step(r: dict) -> str:
    """The first run's first step (a cold compile cache) and, after several runs, the median
    of the others' (the cache filled)."""
    runs = r["first_step_s_runs"]
    return f"{runs[0]:.2f}" + (f" / {statistics.median(runs[1:]):.2f}" if len(runs) > 1 else "")


def _conv(r: dict) -> str:
    variant = r.get("kernels_variant")
    return r.get("conv", "-") + (f" ({variant})" if variant else "")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Benchmark: {m.get('gpu') or m['cpu']}, {m['cores']} CPU cores",
        "",
        f"Command: `{result['command']}` ({result['date']}); torch {m['torch']}, "
        f"python {m['python']}, numpy {m['numpy']}, {m['platform']}. {_isa_note(m)}"
        f"Each case ran {_rounds(result)} in fresh processes; timings are medians"
        f"{_accuracy_note(result)}.",
        "",
        "- **img/s**: train images per second in the steady state; the first step "
        f"(compilation) and the next {result['warmup_steps']} (warm-up) are timed apart. "
        "**first step s**: the first run of a case compiles with the benchmark's compile cache "
        "empty (cold); after several runs, `cold / warm` (the median of the others').",
        "- **to 98% / 99%**: train seconds to the first test-set evaluation (at "
        f"{result['evals_per_epoch']} points an epoch, the last at its end) whose "
        "accuracy reaches the mark, evaluation excluded, and compilation too: the first step "
        "and the warm-up count at the steady-state rate (their own times are in their "
        "columns); `-`: not reached.",
        "- **baseline**: the same model, optimizer, schedule and batch size in fp32 eager, "
        f"reading MNIST the classic way: {result['baseline_transform']}, a DataLoader "
        f"(num_workers={result['baseline_workers']}) with a DistributedSampler, `loss.item()` "
        "every step. Ratios are pipeline/baseline of the "
        "same config and world size (for time to 99%: baseline time / pipeline time); with "
        "repeats, img/s is the median over the rounds and `vs baseline` the median of the "
        "per-round ratios, with their range.",
        "- **other load**: CPU cores other programs kept busy meanwhile; above ~0.2 the "
        "timings of that case are disturbed.",
        *_kernel_note(result),
        "",
        "| case | ranks x threads | batch | precision | compile | conv | img/s | vs baseline | "
        "epoch s (first / rest) | first step s | warm-up s | to 98% s | to 99% s | "
        "99% vs baseline | accuracy by epoch | other load |",
        "|" + "---|" * 16,
    ]
    for r in result["records"]:
        ep = r["epoch_s"]
        rest = statistics.mean(ep[1:]) if len(ep) > 1 else None
        accs = " ".join(percent(a) for a in r["accuracy"])
        lines.append(
            f"| {r['name']} | {r['world']} x {r['threads']} | {r['batch_size']} | "
            f"{r['precision']} | {r['compile']} | {_conv(r)} | "
            f"{r['images_per_s']:,.0f} | "
            f"{_x_runs(r)} | {ep[0]:.1f} / {fmt_s(rest)} | {_first_step(r)} | "
            f"{r['warmup_s']:.2f} | {fmt_s(r['time_to']['98%'], '.3f')} | "
            f"{fmt_s(r['time_to']['99%'], '.3f')} | "
            f"{_x(r['time_to_99_speedup'])} | {accs} | {r['other_load']:.2f} |"
        )
    return "\n".join([*lines, "", *headlines(result["records"])]) + "\n"
