"""``pst-yolo check``: prove this machine's PST path end to end in minutes; on CUDA, the path every user trains on.

Parts (each reports passed / failed / skipped with the reason, and its numbers):

- ``backends``: every usable attention backend (naive, sdpa, flash, sage) against a float64 reference, per dtype
  (fp32; fp16 and bf16 where the device runs them) and per coarse pass (fused, kernel), on odd and paper-sized
  shapes, forward and (backends with a backward pass) gradients. Tolerance: flash-attention's rule, the error at most
  twice that of the plain PyTorch computation in the same precision (SageAttention: plus a fixed int8 bound).
- ``train``: a few epochs of YOLOv11-PST-N on the offline demo digits (``pst_yolo.tools.datasets``), with AMP on CUDA;
  then the fine-map statistics of best.pt must be finite and k=8 must change its outputs against k=0.
- ``val``: validation at k=0 and k=8, ``half=True`` on CUDA.
- ``export``: ONNX (onnxruntime) and, on CUDA with TensorRT installed, fp32 and fp16 engines, each against PyTorch,
  and an INT8 engine calibrated on the digits' val split: its k=8 output must still move against its k=0 output by
  at least half of what fp32 PyTorch's does, and lie nearer fp32 k=8 than fp32 k=0 (the fine attention survives).
- ``speed`` (CUDA by default): the op per backend and YOLOv11-PST-N (k=0, k=8 per backend) against the stock YOLO12n
  it extends, latency and peak memory (paper Table 4f style).

    pst-yolo check                          # all parts this machine supports; report in runs/check/check.md
    pst-yolo check --quick --out /tmp/chk   # tiny settings (a smoke test)
    pst-yolo check --parts backends speed   # choose parts (speed runs on the CPU too when asked for)

The float64 reference is the op's ``naive`` backend in float64 on the CPU, which tests/test_ops.py checks against an
independent loop implementation of eq. 2-5. Exit code 0 when no part failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .check_kernels import Part, check_backends, check_speed

PARTS = ("backends", "train", "val", "export", "speed")
MIN_FINE_EFFECT = 1e-6  # a dropped fine branch moves the outputs by exactly 0, a hidden one by ~1e-7


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pst-yolo check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("runs/check"), help="output folder (data, runs, check.md)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda when available)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="default: every part the device supports")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny settings: 1 epoch, 16/8 images at 64 px")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.imgsz, args.train_images, args.val_images, args.batch = 1, 64, 16, 8, 8
    return args


# ------------------------------------------------------------------------------------------- train, val, export
def check_training(args, device, data: Path) -> tuple[Part, Path | None]:
    import torch
    from ultralytics import YOLO

    from ..ops import resolve_backend
    from .demo import SHORT_SCHEDULE

    part = Part("train")
    model = YOLO("yolo11n-pst.yaml")
    cuda = device.type == "cuda"
    model.train(
        data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=0 if not cuda else 2,
        device=_ultralytics_device(device), amp=cuda, plots=False, project=str(args.out / "runs"), name="train",
        exist_ok=True, seed=0, deterministic=True, **SHORT_SCHEDULE,
    )  # fmt: skip
    trainer = model.trainer
    weights = Path(trainer.save_dir) / "weights" / "best.pt"
    losses = {k: float(v) for k, v in trainer.label_loss_items(trainer.tloss, prefix="train").items()}
    probe = torch.zeros(1, 1, 1, 32, device=device, dtype=torch.float16 if cuda else torch.float32).requires_grad_()
    backend = resolve_backend("auto", probe)  # what the PSA layers ran with under AMP
    row = {"epochs": args.epochs, "imgsz": args.imgsz, "amp": bool(trainer.amp), "attention": backend, **losses}
    if weights.exists():
        row["fine stats finite"] = fine_statistics_finite(weights)
        row["k=8 vs k=0"] = fine_branch_effect(weights, _val_batch(data, args.imgsz), args.imgsz)
    part.rows.append(row)
    part.status, part.reason = training_verdict(cuda, row, weights.exists(), check_effect=not args.quick)
    return part, weights if weights.exists() else None


def training_verdict(cuda: bool, row: dict, saved: bool, check_effect: bool = True) -> tuple[str, str]:
    """Status and reason of the train part from its row (losses, ``amp``, ``fine stats finite``, ``k=8 vs k=0``).

    Failed: no best.pt, a non-finite loss, non-finite fine-map statistics, or (``check_effect``) a fine branch that
    does not change the outputs; ``--quick`` trains too little for BN statistics to leave their init (k=8 moves the
    outputs by ~1e-6 after one epoch on 16 images, 1e-3 after the default 3 epochs on 200). AMP off on CUDA is no
    failure: Ultralytics switches it off on purpose (a GPU it blacklists, or a failed ``check_amp``); the reason then
    says that AMP went untested.
    """
    problems = []
    if not saved:
        problems.append("no best.pt")
    if not all(math.isfinite(v) for k, v in row.items() if k.startswith("train/")):
        problems.append("non-finite losses")
    if saved and not row["fine stats finite"]:
        problems.append("non-finite fine-map statistics in best.pt")
    effect = row.get("k=8 vs k=0", 0.0)
    if saved and not math.isfinite(effect):
        problems.append("k=8 gives non-finite outputs")
    elif saved and check_effect and effect <= MIN_FINE_EFFECT:
        problems.append(f"k=8 changes the outputs by {effect:.1e} against k=0: the fine attention does not act")
    if problems:
        return "failed", "; ".join(problems)
    if cuda and not row["amp"]:
        return "passed", "Ultralytics switched AMP off (its check_amp): trained in fp32, AMP untested on this GPU"
    return "passed", "" if check_effect else "k=8 vs k=0 not judged (--quick trains too little)"


def fine_statistics_finite(weights: Path) -> bool:
    """Whether every PSA module of a checkpoint has finite fine-map statistics (fine_kv_mean, fine_kv_var)."""
    from ultralytics import YOLO

    from ..nn import PSAttn

    psa = [m for m in YOLO(str(weights)).model.modules() if isinstance(m, PSAttn)]
    return bool(psa) and all(m.fine_kv_mean.isfinite().all() and m.fine_kv_var.isfinite().all() for m in psa)


def _ultralytics_device(device) -> str:
    return "cpu" if device.type == "cpu" else str(device.index or 0)


def check_validation(args, device, data: Path, weights: Path) -> Part:
    from ultralytics import YOLO

    from ..nn import set_topk

    part = Part("val")
    half_options = (True, False) if device.type == "cuda" else (False,)
    for topk in (0, 8):
        for half in half_options:
            model = YOLO(str(weights))
            set_topk(model.model, topk)
            metrics = model.val(
                data=str(data), imgsz=args.imgsz, batch=args.batch, device=_ultralytics_device(device),
                plots=False, project=str(args.out / "runs"), name=f"val-k{topk}-half{half}", exist_ok=True,
                quantize=16 if half else None,
            )  # fmt: skip
            row = {"topk": topk, "half": half, "mAP50": float(metrics.box.map50), "mAP50-95": float(metrics.box.map)}
            part.rows.append(row)
            if not all(math.isfinite(row[key]) for key in ("mAP50", "mAP50-95")):
                part.status, part.reason = "failed", "non-finite metrics"
    return part


def fine_branch_effect(weights: Path, x, imgsz: int) -> float:
    """Largest change of the raw fp32 output between k=0 and k=8 on images x (boxes in units of the input size)."""
    import torch
    from ultralytics import YOLO

    from ..nn import set_topk

    model = YOLO(str(weights)).model.float().fuse().eval()
    outputs = []
    for topk in (0, 8):
        set_topk(model, topk)
        with torch.no_grad():
            outputs.append(model(x)[0])
    return _output_difference(outputs[1], outputs[0], imgsz)


def _val_batch(data: Path, imgsz: int):
    """Up to 4 validation images letterboxed to imgsz: (B, 3, imgsz, imgsz) float32 in [0, 1]."""
    from .calibration import letterboxed_files

    return letterboxed_files(sorted((data.parent / "images" / "val").glob("*.png"))[:4], (imgsz, imgsz))


def _output_difference(a, b, imgsz: int, mean: bool = False) -> float:
    """Largest (``mean``: mean) |a - b| of two raw detection outputs (B, 4 + nc, anchors), boxes in units of the input
    size. INT8 is judged by the mean: a max tracks single outliers, not the quantizer."""
    diff = (a.double().cpu() - b.double().cpu()).abs()
    diff[:, :4] /= imgsz
    return (diff.mean() if mean else diff.max()).item()


def int8_row(int8: dict, fp32: dict, imgsz: int, fmt: str = "engine") -> dict:
    """Judge an INT8 export by its k=0 and k=8 outputs (``{k: output}``) against fp32 PyTorch's: the fine attention
    survives if INT8's k=8 - k=0 move is at least half of fp32's and INT8 k=8 lies nearer fp32 k=8 than fp32 k=0."""
    move, fp32_move = (_output_difference(d[8], d[0], imgsz, mean=True) for d in (int8, fp32))
    to_k8, to_k0 = (_output_difference(int8[8], fp32[k], imgsz, mean=True) for k in (8, 0))
    ok = move >= 0.5 * fp32_move and to_k8 < to_k0
    return {"format": fmt, "half": False, "int8": True, "topk": 8, "vs_torch": to_k8, "k=8 - k=0": move,
            "fp32 k=8 - k=0": fp32_move, "vs torch k=0": to_k0, "status": "ok" if ok else "FAILED"}  # fmt: skip


def check_export(args, device, data: Path, weights: Path) -> Part:
    """ONNX (and TensorRT fp32/fp16/INT8 on CUDA) at k=0 and k=8 against PyTorch on validation images."""
    import torch
    from ultralytics import YOLO

    from ..nn import PSAttn, set_topk

    part = Part("export")
    formats = [("onnx", 32)]
    if device.type == "cuda":
        if importlib.util.find_spec("tensorrt") is None:
            part.reason = "TensorRT skipped: package 'tensorrt' is not installed (pip install tensorrt)"
        else:
            formats += [("engine", 32), ("engine", 16), ("engine", 8)]
    else:
        part.reason = "TensorRT skipped: needs a CUDA GPU"
    x = _val_batch(data, args.imgsz)
    int8, fp32_by_k = {}, {}
    for topk in (0, 8):
        model = YOLO(str(weights)).model.float().fuse().eval()
        set_topk(model, topk)
        with torch.no_grad():
            fp32, fp64 = model(x)[0], model.double()(x.double())[0]
            fp16 = model.to(device).half()(x.to(device).half())[0] if device.type == "cuda" else None
        fp32_by_k[topk] = fp32
        for fmt, precision in formats:
            half = precision == 16
            quantize = {32: {}, 16: {"quantize": 16}, 8: {"quantize": 8, "data": str(data)}}[precision]
            PSAttn.override_topk(topk)
            try:
                path = YOLO(str(weights)).export(format=fmt, imgsz=args.imgsz, device=_ultralytics_device(device),
                                                 batch=x.shape[0], **quantize)  # fmt: skip
            finally:
                PSAttn.override_topk(None)
            out = run_exported(path, x, device if fmt == "engine" else torch.device("cpu"), half)
            if precision == 8:  # judged once both k are in
                int8[topk] = out
                continue
            same_precision = fp16 if half else fp32  # TensorRT fp32 engines may use TF32: judged like fp16 below
            plain_error = _output_difference(same_precision if fmt == "onnx" else fp16 if fp16 is not None else fp32,
                                             fp64, args.imgsz)  # fmt: skip
            row = {"format": fmt, "half": half, "topk": topk, "vs_torch": _output_difference(out, fp32, args.imgsz),
                   "error": _output_difference(out, fp64, args.imgsz), "torch_error": plain_error}  # fmt: skip
            tolerance = 2 * plain_error + (1e-6 if fmt == "onnx" else 1e-3)
            row["status"] = (
                "ok" if row["error"] <= tolerance and (fmt != "onnx" or row["vs_torch"] < 1e-4) else "FAILED"
            )
            part.rows.append(row)
    if int8:
        part.rows.append(int8_row(int8, fp32_by_k, args.imgsz))
    if any(row["status"] == "FAILED" for row in part.rows):
        part.status = "failed"
    return part


def run_exported(path: str, x, device, half: bool):
    """Raw output of an exported model on images x (B, 3, H, W) float32, as a float32 tensor.

    x goes in as float32 whatever ``half``: AutoBackend casts it to half where the model's input binding is half. A
    TensorRT fp16 engine built from an fp32 ONNX keeps fp32 bindings, and half input there is read as garbage.
    """
    from ultralytics.nn.autobackend import AutoBackend

    backend = AutoBackend(path, device=device, fp16=half)
    out = backend(x.to(backend.device).float())
    return (out[0] if isinstance(out, (list, tuple)) else out).float()


# ----------------------------------------------------------------------------------------------------- driver
def markdown(parts: list[Part], header: str) -> str:
    lines = [header, "", "| part | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.reason} |" for p in parts]
    for p in parts:
        if not p.rows:
            continue
        keys = list(dict.fromkeys(k for row in p.rows for k in row))
        lines += ["", f"### {p.name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in p.rows:
            lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def cpu_skips(device) -> list[Part]:
    """The GPU parts a CPU run leaves out, each with its reason."""
    import torch

    from ..ops.backends import unusable_reason

    probe = torch.zeros(1, 1, 1, 32, device=device, dtype=torch.float16)
    kernels = "; ".join(f"{b}: {unusable_reason(b, probe, needs_grad=False) or 'usable'}" for b in ("flash", "sage"))
    return [
        Part("backends on CUDA", "skipped", f"fp16/bf16 kernels need a CUDA GPU ({kernels})"),
        Part("train with AMP", "skipped", "AMP needs CUDA (Ultralytics turns it off on the CPU): trained in fp32"),
        Part("val half=True", "skipped", "half-precision validation needs CUDA (Ultralytics forces fp32 on the CPU)"),
        Part("export TensorRT", "skipped", "TensorRT engines (fp32, fp16, INT8) need a CUDA GPU and tensorrt"),
    ]


def run_parts(args, device) -> list[Part]:
    """Run the asked-for parts (default: all, speed only on CUDA); a part that raises is reported as failed."""
    cuda = device.type == "cuda"
    wanted = args.parts or [p for p in PARTS if p != "speed" or cuda]
    parts, data, weights = [], None, None
    for name in wanted:
        start = time.perf_counter()
        print(f"\n=== pst-yolo check: {name} on {device}", flush=True)
        try:
            if name == "backends":
                part = check_backends(device)
            elif name == "speed":
                part = check_speed(args, device)
            else:
                if data is None:
                    from .datasets import build_digits_detection

                    data = build_digits_detection(args.out / "data", args.train_images, args.val_images, args.imgsz)
                if name == "train":
                    part, weights = check_training(args, device, data)
                elif weights is None:
                    part = Part(name, "skipped", "needs the weights of the train part (--parts train ...)")
                else:
                    part = (check_validation if name == "val" else check_export)(args, device, data, weights)
        except Exception as e:  # noqa: BLE001  (a part that crashes is a failed part; the others still run)
            part = Part(name, "failed", f"{type(e).__name__}: {e}")
            traceback.print_exc()
        part.seconds = time.perf_counter() - start
        parts.append(part)
    for name in PARTS:
        if name not in wanted:
            reason = "not asked for (--parts)"
            if name == "speed" and not cuda:
                reason = "timing is a GPU check (paper Table 4f); --parts speed times this CPU, or see pst-yolo bench"
            parts.append(Part(name, "skipped", reason))
    return parts + ([] if cuda else cpu_skips(device))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``pst-yolo check``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out = args.out.resolve()
    from .demo import offline_env

    env = offline_env(args.out)
    if env != dict(os.environ):  # Ultralytics reads these at import: restart once with them set
        raise SystemExit(subprocess.call([sys.executable, "-m", "pst_yolo", "check", *argv], env=env))
    import torch

    import pst_yolo  # noqa: F401

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    parts = run_parts(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"# pst-yolo check\n\nDevice: {name}; torch {torch.__version__}; {time.perf_counter() - start:.0f} s; "
        f"command: `pst-yolo check {' '.join(argv)}`"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "check.md"
    report.write_text(markdown(parts, header))
    print("\n" + "\n".join(f"{p.name:17s} {p.status:8s} {p.seconds:5.0f} s  {p.reason}" for p in parts))
    print(f"report: {report}")
    raise SystemExit(1 if any(p.status == "failed" for p in parts) else 0)


if __name__ == "__main__":
    main()
