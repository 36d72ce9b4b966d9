"""The attention-kernel parts of ``pst-yolo check``: every usable backend against float64 (``backends``), and the
op and model latency per backend (``speed``); plus :class:`Part`, the outcome every part reports."""

from __future__ import annotations

from dataclasses import dataclass, field

SHAPES = [(2, 2, (13, 13)), (2, 1, (16, 16)), (1, 1, (40, 40))]  # (B, heads, fine H x W); 40x40: 320 px P3
SAGE_SHAPES = [(2, 1, (16, 16)), (1, 1, (32, 32)), (1, 1, (40, 40))]  # keys M = 64, 256, 400 (400: must be refused)
FP32_ATOL = 1e-4
# SageAttention quantises q and k to int8: its error is judged against this fixed bound, never against the kernel's
# own error (a broken kernel would raise its own bar). The int8 model of sageattention 1.0.6 in tests/standins errs
# 0.04-0.07 (max abs, against float64) on SAGE_SHAPES over three seeds, fp16 and bf16.
SAGE_INT8_ATOL = 0.1


@dataclass
class Part:
    """Outcome of one part: status ``passed``/``failed``/``skipped``, why, and a table of numbers."""

    name: str
    status: str = "passed"
    reason: str = ""
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype, generator=g)
    calls = {label: forward_with_topk(*variant[:3], x) for label, variant in variants.items()}
    with torch.inference_mode():
        ms = time_round_robin(calls, repeats, warmup, device)
        mb = {label: peak_memory_mb(fn, device) for label, fn in calls.items()}
    for label in calls:
        part.rows.append(
            {"what": f"model {imgsz} px {str(dtype)[6:]}", "backend": label, "ms": ms[label], "peak_mb": mb[label]}
        )
    return part
