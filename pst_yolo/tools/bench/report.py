"""Reports of ``pst-yolo bench``: the machine's description, ``bench.md`` (a Markdown table per section) and
``bench.png`` (op latency against top-k, model latencies)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .op import COARSE_PASS


def machine_description(device: torch.device, threads: int, clock: str) -> dict:
    """CPU model, cores, threads used, clock, torch (and onnxruntime) versions and the device's name."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].strip() if names else cpu
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "threads": threads, "clock": clock}
    info["torch"] = torch.__version__
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a Markdown table; columns are (key, header, format spec)."""

    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """``bench.md``: the machine, the GEMM reference and a table per section of ``results`` (as ``main`` returns it)."""
    m = results["machine"]
    parts = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} threads used), device {m['device']}, "
        f"torch {m['torch']}" + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f"; {m['clock']} clock.",
        f"Dense fp32 GEMM ({results['gemm']['size']}^2): {results['gemm']['gflops']:.1f} GFLOP/s.",
        "### PSA op (batch 1, head dim 32)\n\n" + markdown_table(results["op"], [
            ("imgsz", "input", "d"), ("level", "level", "s"), ("fine", "queries", "s"), ("coarse", "keys", "s"),
            ("heads", "heads", "d"), ("backend", "backend", "s"), ("topk", "top-k", "d"), ("ms", "ms", ".2f"),
            ("x_sdpa_ms", "x bare SDPA", ".2f"), ("peak_mb", "peak MB", ".2f"), ("x_sdpa_mem", "mem x SDPA", ".2f"),
            ("gflops", "GFLOP/s", ".1f"), ("gemm_fraction", "of GEMM", ".2f")]),
        "### Score step (eq. 2 + eq. 3) at 640 P3\n\n" + markdown_table(results["score_step"], [
            ("variant", "variant", "s"), ("batch", "batch", "d"), ("ms", "ms", ".1f"), ("peak_mb", "peak MB", ".1f"),
            ("x_dense_mem", "mem x dense", ".3f")]),
        "### Models (fused, eval, random weights)\n\n" + markdown_table(results["models"], [
            ("runtime", "runtime", "s"), ("model", "model", "s"), ("batch", "batch", "d"), ("ms", "ms", ".1f"),
            ("attention_ms", "of which PSA attention nodes ms", ".1f")]),
        "### Training iteration (as Ultralytics' trainer: forward + loss + backward; clip + SGD + EMA every "
        "accumulate iterations)\n\n" + markdown_table(results["train"], [
            ("model", "model", "s"), ("batch", "batch", "d"), ("imgsz", "imgsz", "d"),
            ("forward_backward_ms", "forward+backward ms", ".0f"), ("optimizer_ms", "optimizer step ms", ".0f"),
            ("accumulate", "accumulate", "d"), ("ms", "ms/iteration", ".0f"), ("images_per_s", "images/s", ".2f"),
            ("page_faults", "page faults", ".0f"), ("replaced_layers", "layers", "s"),
            ("replaced_layers_ms", "those layers alone ms", ".1f"), ("convs_ms", "their Conv modules ms", ".1f"),
            ("conv_kernels_ms", "their conv kernels ms", ".1f"), ("attention_ms", "attention kernel ms", ".1f"),
            ("conv_gflops", "conv kernels GFLOP/s", ".1f"), ("attention_gflops", "attention GFLOP/s", ".1f"),
            ("gemm_gflops", "GEMM GFLOP/s, same rounds", ".1f")]),
    ]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Op latency against top-k (per input size at P3, per backend) and model latencies, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for imgsz in sorted({r["imgsz"] for r in results["op"]}):
        for backend in sorted({r["backend"] for r in results["op"]} - {"bare sdpa", COARSE_PASS}):
            rows = [r for r in results["op"] if r["imgsz"] == imgsz and r["level"] == "P3" and r["backend"] == backend]
            if rows:
                left.plot([r["topk"] for r in rows], [r["ms"] for r in rows], marker="o", label=f"{backend} {imgsz}")
    left.set(xlabel="top-k", ylabel="ms", yscale="log", title="PSA op at P3 (1 head)")
    left.legend(fontsize=7)
    short = {"pytorch": "torch", "onnxruntime": "onnx"}
    labels = [f"{r['model']} ({short.get(r['runtime'], r['runtime'])}, b{r['batch']})" for r in results["models"]]
    right.barh(labels, [r["ms"] for r in results["models"]])
    right.set(xlabel="ms", title=f"Models at {results['imgsz']}")
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
