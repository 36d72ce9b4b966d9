"""``pst-yolo bench``: the PSA op, its score step, whole models (PyTorch and ONNX Runtime) and a training step,
PST models against stock Ultralytics ones (by default YOLO12n, YOLO11n and YOLO11s).

    pst-yolo bench                                   # CPU defaults
    pst-yolo bench --device cuda --model-batches 1 16
    pst-yolo bench --threads 1 --clock cpu           # on a shared CPU: compute time, not time spent waiting
    pst-yolo bench --quick --out /tmp/bench          # tiny smoke run

Timing: each table's variants run round-robin (one call of each per round) after warm-up, so load from other
processes hits every variant alike; tables give medians. Peak memory: on CUDA the allocator's peak above the
starting point; on CPU the peak of live tensor bytes, tracked by a dispatch mode that sees every tensor an aten op
returns and notices when its storage is freed (kernel-internal scratch, such as the CPU SDPA kernel's per-thread
blocks, is not seen). Writes ``bench.md``, ``bench.json`` and ``bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from ...validation import argparse_type, check_int
from .models import bench_models_eager, model_variants
from .onnx_runtime import bench_models_onnx
from .op import bench_op, bench_score_step
from .report import machine_description, markdown_report, plot
from .timing import CLOCKS, gemm_gflops
from .train import bench_train

TOPKS = (0, 8, 16, 32)
OP_SIZES = (320, 640, 1280)
BACKENDS = ("naive", "sdpa", "flash", "sage")  # concrete attention backends; --model-backends also takes "auto"
MODELS = ("yolo12n", "yolo11n", "yolo11n-pst", "yolo12n-pst", "yolo11s", "yolo11s-pst")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options of ``pst-yolo bench`` (``--quick`` replaces the sizes with tiny ones)."""
    parser = argparse.ArgumentParser(
        prog="pst-yolo bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def count(name: str, minimum: int = 1, multiple_of: int = 1):
        """argparse type: an integer >= minimum (and a multiple of ``multiple_of``), errors naming the option."""
        convert = argparse_type(check_int, name, minimum=minimum)

        def checked(text: str) -> int:
            value = convert(text)
            if value % multiple_of:
                raise argparse.ArgumentTypeError(f"{name} must be a multiple of {multiple_of}, got {value}.")
            return value

        checked.__name__ = name
        return checked

    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=count("threads"), default=len(os.sched_getaffinity(0)), help="CPU threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (shared CPU)")
    parser.add_argument("--repeats", type=count("repeats"), default=10, help="timed rounds per table")
    parser.add_argument("--warmup", type=count("warmup", 0), default=2, help="untimed rounds first")
    parser.add_argument(
        "--op-sizes", type=count("op-sizes", 32, 16), nargs="+", default=list(OP_SIZES), help="op input sizes"
    )
    parser.add_argument("--topks", type=count("topks", 0), nargs="+", default=list(TOPKS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="usable ones run")
    parser.add_argument("--naive-max-size", type=count("naive-max-size", 0), default=640, help="skip naive above this")
    parser.add_argument("--score-batch", type=count("score-batch"), default=8, help="batch of the score-step table")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="YAML names without .yaml")
    parser.add_argument("--imgsz", type=count("imgsz", 32, 32), default=640, help="model input size")
    parser.add_argument("--model-batches", type=count("model-batches"), nargs="+", default=[1], help="e.g. 1 16")
    parser.add_argument("--model-topk", type=count("model-topk", 0), default=8, help="PST models' top-k (and 0)")
    parser.add_argument("--model-backends", nargs="+", choices=("auto", *BACKENDS), default=["auto", "naive"])
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even when installed")
    parser.add_argument("--train-batch", type=count("train-batch"), default=8)
    parser.add_argument("--train-imgsz", type=count("train-imgsz", 32, 32), default=320)
    parser.add_argument("--train-steps", type=count("train-steps"), default=8, help="timed steps per model")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if not model_yaml_exists(name)]
    if unknown:
        parser.error(f"argument --models: no model YAML for {', '.join(unknown)} (give names like yolo11n-pst).")
    if args.quick:
        args.repeats, args.warmup, args.op_sizes, args.topks = 2, 1, [64], [0, 8]
        args.score_batch, args.models, args.imgsz, args.model_batches = 1, ["yolo12n", "yolo11n-pst"], 64, [1]
        args.train_batch, args.train_imgsz, args.train_steps = 2, 64, 1
    return args


def device_name(text: str) -> str:
    """argparse type: a torch device that exists here (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got '{text}'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device '{text}' asked for, but CUDA is not available here.")
    return text


def model_yaml_exists(name: str) -> bool:
    """Whether ``<name>.yaml`` resolves (as ``DetectionModel`` resolves it) to a stock or a shipped model YAML."""
    from ultralytics.nn.tasks import yaml_model_load

    import pst_yolo  # noqa: F401  (finds the shipped YAMLs by short name)

    try:
        yaml_model_load(f"{name}.yaml")
    except FileNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    """Run every section and write bench.md / bench.json / bench.png to ``--out``; returns what bench.json holds."""
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    gemm_size = 256 if args.quick else (8192 if device.type == "cuda" else 2048)
    results = {"machine": machine_description(device, args.threads, args.clock), "imgsz": args.imgsz}
    results["args"] = vars(args) | {"out": str(args.out)}
    gflops = gemm_gflops(device, gemm_size, max(3, args.repeats // 2), args.clock)
    results["gemm"] = {"size": gemm_size, "gflops": gflops}
    print(f"GEMM: {results['gemm']['gflops']:.1f} GFLOP/s")
    results["op"] = bench_op(args, device, dtype, results["gemm"]["gflops"])
    results["score_step"] = bench_score_step(args, device, dtype)
    variants = model_variants(args.models, args.model_topk, args.model_backends, device)
    results["models"] = bench_models_eager(args, variants, device)
    if not args.no_onnx and importlib.util.find_spec("onnxruntime") is not None:
        with tempfile.TemporaryDirectory() as onnx_folder:
            results["models"] += bench_models_onnx(args, variants, Path(onnx_folder))
    torch.manual_seed(0)  # the training models' initial weights do not depend on the sections before
    results["train"] = bench_train(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "bench.md").write_text(markdown_report(results))
    plot(results, args.out / "bench.png")
    print(f"Results in {args.out}/bench.md, bench.json, bench.png")
    return results
