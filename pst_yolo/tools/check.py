"""``pst-yolo check``: prove this machine's PST path end to end in minutes; on CUDA, the path every user trains on.

Parts (each reports passed / failed / skipped with the reason, and its numbers):

- ``backends``: every usable attention backend (naive, sdpa, flash, sage) against a float64 reference, per dtype
  (fp32; fp16 and bf16 where the device runs them) and per coarse pass (fused, kernel), on odd and paper-sized
  shapes, forward and (backends with a backward pass) gradients. Tolerance: flash-attention's rule, the error at most
  twice that of the plain PyTorch computation in the same precision (SageAttention: plus a fixed int8 bound).
- ``train``: a few epochs of YOLOv11-PST-N on the offline demo digits (``pst_yolo.tools.datasets``), with AMP on CUDA;
  then the fine-map statistics of best.pt must be finite and k=8 must change its outputs against k=0.
- ``val``: validation at k=0 and k=8, ``half=True`` on CUDA.
- ``export``: ONNX (onnxruntime) and, on CUDA with TensorRT installed, fp32 and fp16 engines, each against PyTorch.
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
from dataclasses import dataclass, field
from pathlib import Path

PARTS = ("backends", "train", "val", "export", "speed")
SHAPES = [(2, 2, (13, 13)), (2, 1, (16, 16)), (1, 1, (40, 40))]  # (B, heads, fine H x W); 40x40: 320 px P3
SAGE_SHAPES = [(2, 1, (16, 16)), (1, 1, (32, 32)), (1, 1, (40, 40))]  # keys M = 64, 256, 400 (400: must be refused)
FP32_ATOL = 1e-4
# SageAttention quantises q and k to int8: its error is judged against this fixed bound, never against the kernel's
# own error (a broken kernel would raise its own bar). The int8 model of sageattention 1.0.6 in tests/standins errs
# 0.04-0.07 (max abs, against float64) on SAGE_SHAPES over three seeds, fp16 and bf16.
SAGE_INT8_ATOL = 0.1
MIN_FINE_EFFECT = 1e-6  # a dropped fine branch moves the outputs by exactly 0, a hidden one by ~1e-7


@dataclass
class Part:
    """Outcome of one part: status ``passed``/``failed``/``skipped``, why, and a table of numbers."""

    name: str
    status: str = "passed"
    reason: str = ""
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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


# ------------------------------------------------------------------------------------------------ backends
def psa_case(batch: int, heads: int, fine_hw: tuple[int, int], seed: int = 0):
    """float32 CPU inputs q, k, v, k_fine, v_fine (B, h, tokens, 32) and the coarse grid; q sharpened by 2."""
    import torch

    coarse_hw = ((fine_hw[0] + 1) // 2, (fine_hw[1] + 1) // 2)
    n, m = fine_hw[0] * fine_hw[1], coarse_hw[0] * coarse_hw[1]
    g = torch.Generator().manual_seed(seed)
    q, k, v, kf, vf = (torch.randn(batch, heads, s, 32, generator=g) for s in (n, m, m, n, n))
    return [q * 2, k, v, kf, vf], coarse_hw


def compare_backend(backend, dtype, coarse_pass, topk, case, device, grad=False) -> dict:
    """One row: max error of the op (or of its input gradients) against float64, and the plain path's error."""
    import torch

    from ..ops import pyramid_sparse_attention

    (inputs, coarse_hw), fine_hw = case[:2], case[2]
    rounded = [t.to(dtype) for t in inputs]  # the reference sees the same rounded inputs (flash-attention's rule)

    def run(tensors, name, pass_, on):
        tensors = [t.detach().to(on).requires_grad_(grad) for t in tensors]
        with torch.set_grad_enabled(grad):
            out = pyramid_sparse_attention(*tensors, fine_hw, coarse_hw, topk, backend=name, coarse_pass=pass_)
            if not grad:
                return out.double().cpu()
            torch.autograd.backward(out, torch.ones_like(out))  # gradients of out.sum(), in out's dtype
            return torch.cat([t.grad.double().cpu().flatten() for t in tensors if t.grad is not None])

    reference = run([t.double() for t in rounded], "naive", "fused", "cpu")
    plain = run(rounded, "naive", "fused", device)
    fast = run(rounded, backend, coarse_pass, device)
    return {
        "backend": backend, "dtype": str(dtype).replace("torch.", ""), "pass": coarse_pass or "-", "topk": topk,
        "shape": f"{inputs[0].shape[0]}x{inputs[0].shape[1]}x{fine_hw[0]}x{fine_hw[1]}", "grad": grad,
        "error": (fast - reference).abs().max().item(), "plain_error": (plain - reference).abs().max().item(),
    }  # fmt: skip


def check_backends(device, dtypes=None, backends=("naive", "sdpa", "flash", "sage")) -> Part:
    """Every usable backend x dtype x shape against float64: top-k 0 (forward and, except sage, gradients, as in
    training) and top-k 8 through each coarse pass (see the module docstring)."""
    import torch

    from ..ops.backends import unusable_reason

    part = Part("backends")
    dtypes = dtypes or [torch.float32, torch.float16, torch.bfloat16]
    for backend in backends:
        for dtype in dtypes:
            probe = torch.zeros(1, 1, 1, 32, device=device, dtype=dtype)
            reason = unusable_reason(backend, probe, needs_grad=False)
            if reason is not None:
                part.rows.append({"backend": backend, "dtype": str(dtype)[6:], "status": f"skipped: {reason}"})
                continue
            runs = [(None, 0, False), (None, 0, backend != "sage"), ("fused", 8, False), ("kernel", 8, False)]
            for batch, heads, fine_hw in SAGE_SHAPES if backend == "sage" else SHAPES:
                case = (*psa_case(batch, heads, fine_hw), fine_hw)
                kv_len = case[1][0] * case[1][1]
                if unusable_reason(backend, probe, False, kv_len) is not None:
                    refused = _refuses(backend, case, dtype, device)
                    status = "refused as expected" if refused else "FAILED: not refused"
                    part.rows.append(
                        {"backend": backend, "dtype": str(dtype)[6:], "shape": f"keys {kv_len}", "status": status}
                    )
                    part.status = part.status if refused else "failed"
                    continue
                for coarse_pass, topk, grad in dict.fromkeys(runs):
                    row = compare_backend(backend, dtype, coarse_pass, topk, case, device, grad)
                    tol = FP32_ATOL if dtype == torch.float32 else 2 * row["plain_error"] + 1e-6
                    tol += SAGE_INT8_ATOL if backend == "sage" else 0.0
                    row["tolerance"], row["status"] = tol, "ok" if row["error"] <= tol else "FAILED"
                    part.rows.append(row)
                    part.status = "failed" if row["status"] == "FAILED" else part.status
    return part


def _refuses(backend, case, dtype, device) -> bool:
    """True when the op with ``backend`` raises the clear error for keys it cannot handle."""
    from ..ops import pyramid_sparse_attention

    inputs, coarse_hw = case[0], case[1]
    try:
        pyramid_sparse_attention(*(t.to(device, dtype) for t in inputs), case[2], coarse_hw, 8, backend=backend)
    except RuntimeError as e:
        return "multiple of" in str(e)
    return False


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


def _precision(half: bool) -> dict:
    """``half=`` for Ultralytics 8.3; ``quantize=16|None`` on 8.4, where ``half`` is deprecated (same meaning)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16 if half else None} if "quantize" in DEFAULT_CFG_DICT else {"half": half}


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
                **_precision(half),
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
    import cv2
    import torch
    from ultralytics.data.augment import LetterBox

    files = sorted((data.parent / "images" / "val").glob("*.png"))[:4]
    images = [LetterBox((imgsz, imgsz), auto=False)(image=cv2.imread(str(f))) for f in files]
    return torch.stack([torch.from_numpy(im[..., ::-1].transpose(2, 0, 1).copy()) for im in images]).float() / 255


def _output_difference(a, b, imgsz: int) -> float:
    """Largest |a - b| of two raw detection outputs (B, 4 + nc, anchors), boxes in units of the input size."""
    a, b = a.double().cpu(), b.double().cpu()
    diff = (a - b).abs()
    diff[:, :4] /= imgsz
    return diff.max().item()


def check_export(args, device, data: Path, weights: Path) -> Part:
    """ONNX (and TensorRT fp32/fp16 on CUDA) at k=0 and k=8 against PyTorch on validation images."""
    import torch
    from ultralytics import YOLO

    from ..nn import PSAttn, set_topk

    part = Part("export")
    formats = [("onnx", False)]
    if device.type == "cuda":
        if importlib.util.find_spec("tensorrt") is None:
            part.reason = "TensorRT skipped: package 'tensorrt' is not installed (pip install tensorrt)"
        else:
            formats += [("engine", False), ("engine", True)]
    else:
        part.reason = "TensorRT skipped: needs a CUDA GPU"
    x = _val_batch(data, args.imgsz)
    for topk in (0, 8):
        model = YOLO(str(weights)).model.float().fuse().eval()
        set_topk(model, topk)
        with torch.no_grad():
            fp32, fp64 = model(x)[0], model.double()(x.double())[0]
            fp16 = model.to(device).half()(x.to(device).half())[0] if device.type == "cuda" else None
        for fmt, half in formats:
            PSAttn.override_topk(topk)
            try:
                path = YOLO(str(weights)).export(
                    format=fmt,
                    imgsz=args.imgsz,
                    device=_ultralytics_device(device),
                    batch=x.shape[0],
                    **_precision(half),
                )
            finally:
                PSAttn.override_topk(None)
            out = run_exported(path, x, device if fmt == "engine" else torch.device("cpu"), half)
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
            part.status = "failed" if row["status"] == "FAILED" else part.status
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


# ------------------------------------------------------------------------------------------------------ speed
def check_speed(args, device) -> Part:
    """Op latency and peak memory per backend at 640 (P3 and P4 shapes of an N model), then YOLOv11-PST-N at k=0 and
    k=8 per backend against the stock YOLO12n, in fp16 on CUDA (paper Table 4f style)."""
    import torch

    from ..ops import pyramid_sparse_attention
    from ..ops.backends import unusable_reason
    from .bench.models import forward_with_topk, model_variants
    from .bench.op import op_shapes, psa_inputs, usable_backends
    from .bench.timing import peak_memory_mb, time_round_robin

    part = Part("speed")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    imgsz, repeats, warmup = (64, 2, 1) if args.quick else (640, 20, 5)
    for shape in op_shapes(imgsz):
        (q, k, v, kf, vf), coarse_hw = psa_inputs(1, shape["heads"], shape["fine_hw"], device, dtype)
        inputs = (q, k, v, kf, vf, shape["fine_hw"], coarse_hw)
        calls = {}
        for backend in ("naive", "sdpa", "flash", "sage"):
            if unusable_reason(backend, q, False, k.shape[2]) is None:
                for topk in (0, 8):
                    calls[(backend, topk)] = lambda b=backend, t=topk, a=inputs: pyramid_sparse_attention(
                        *a, t, backend=b
                    )
        with torch.inference_mode():
            ms = time_round_robin(calls, repeats, warmup, device)
            mb = {key: peak_memory_mb(fn, device) for key, fn in calls.items()}
        what = f"op {shape['level']} {shape['fine_hw'][0]}x{shape['fine_hw'][1]}"
        for key in calls:
            part.rows.append({"what": what, "backend": key[0], "topk": key[1], "ms": ms[key], "peak_mb": mb[key]})
    # Models in the input dtype of the op (fp16 on CUDA, as half=True runs them). Explicit sage would refuse P4's 400
    # keys at 640; with sage installed, "auto" uses it where it can.
    backends = ["auto"] + [b for b in usable_backends(["naive", "sdpa", "flash"], device, dtype)]
    variants = model_variants(["yolo12n", "yolo11n-pst"], 8, backends, device)
    for model, *_ in variants.values():
        model.to(dtype)
    x = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype)
    calls = {label: forward_with_topk(*variant[:3], x) for label, variant in variants.items()}
    with torch.inference_mode():
        ms = time_round_robin(calls, repeats, warmup, device)
        mb = {label: peak_memory_mb(fn, device) for label, fn in calls.items()}
    for label in calls:
        part.rows.append(
            {"what": f"model {imgsz} px {str(dtype)[6:]}", "backend": label, "ms": ms[label], "peak_mb": mb[label]}
        )
    return part


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
        Part("export TensorRT", "skipped", "TensorRT engines (fp32, fp16) need a CUDA GPU and the tensorrt package"),
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
