"""The op section of ``pst-yolo bench``: ``pyramid_sparse_attention`` per input size, level, backend and top-k
against a bare SDPA call, and its score step (eq. 2 + eq. 3) against the dense N x M softmax."""

from __future__ import annotations

from functools import partial

import torch

from .timing import peak_memory_mb, time_round_robin

HEAD_DIM = 32
COARSE_PASS = "eq. 2+3 pass"  # op row: the coarse output and the exact eq. 3 scores, as the op runs them at k > 0


def op_shapes(imgsz: int) -> list[dict]:
    """PSA shapes of an N-scale model at ``imgsz``: P3 (C'=32, 1 head) and P4 (C'=64, 2 heads), upper = half."""
    return [
        {"level": "P3", "fine_hw": (imgsz // 8, imgsz // 8), "heads": 1},
        {"level": "P4", "fine_hw": (imgsz // 16, imgsz // 16), "heads": 2},
    ]


def psa_inputs(batch: int, heads: int, fine_hw: tuple[int, int], device, dtype) -> tuple[list[torch.Tensor], tuple]:
    """Random q, k, v (coarse), k_fine, v_fine: (batch, heads, tokens, 32) each, and the coarse grid."""
    coarse_hw = ((fine_hw[0] + 1) // 2, (fine_hw[1] + 1) // 2)
    n, m = fine_hw[0] * fine_hw[1], coarse_hw[0] * coarse_hw[1]
    g = torch.Generator(device=device).manual_seed(0)
    sizes = (n, m, m, n, n)
    return [torch.randn(batch, heads, s, HEAD_DIM, device=device, dtype=dtype, generator=g) for s in sizes], coarse_hw


def op_flops(batch: int, heads: int, n: int, m: int, topk: int) -> int:
    """Matmul FLOPs of the op: coarse q k^T and p v, the eq. 3 score pass's q k^T, fine attention over 4k tokens."""
    per_head = 4 * n * m * HEAD_DIM
    if topk:
        per_head += 2 * n * m * HEAD_DIM + 4 * n * 4 * min(topk, m) * HEAD_DIM
    return batch * heads * per_head


def usable_backends(names: list[str], device: torch.device, dtype: torch.dtype, kv_len: int | None = None) -> list[str]:
    """The backends of ``names`` that can run inference on ``dtype`` tensors of ``device`` with ``kv_len`` keys
    (None: any key count a model may give, as ``auto`` resolves per layer)."""
    from ...ops.backends import unusable_reason

    probe = torch.zeros(1, 1, 1, HEAD_DIM, device=device, dtype=dtype)
    return [b for b in names if unusable_reason(b, probe, needs_grad=False, kv_len=kv_len) is None]


def bench_op(args, device, dtype, gemm: float) -> list[dict]:
    """Latency, peak memory and throughput of ``pyramid_sparse_attention`` per size, level, backend and top-k, at
    batch 1 on (1, heads, tokens, 32) inputs (:func:`psa_inputs`) in ``dtype``: one row per variant, with the bare SDPA
    call and the eq. 2+3 pass of the same shape as references and ``gemm`` (GFLOP/s) as the throughput reference."""
    from ...ops import attention, coarse_attention_with_scores, pyramid_sparse_attention

    rows = []
    for imgsz in args.op_sizes:
        for shape in op_shapes(imgsz):
            (q, k, v, kf, vf), coarse_hw = psa_inputs(1, shape["heads"], shape["fine_hw"], device, dtype)
            variants = {
                ("bare sdpa", None): partial(attention, q, k, v, "sdpa"),
                (COARSE_PASS, None): partial(coarse_attention_with_scores, q, k, v, "sdpa"),
            }
            for backend in usable_backends(args.backends, device, dtype, kv_len=k.shape[2]):
                if backend == "naive" and imgsz > args.naive_max_size:
                    continue
                for topk in args.topks:
                    variants[(backend, topk)] = partial(
                        pyramid_sparse_attention,
                        q,
                        k,
                        v,
                        kf,
                        vf,
                        shape["fine_hw"],
                        coarse_hw,
                        topk=topk,
                        backend=backend,
                    )
            with torch.inference_mode():
                ms = time_round_robin(variants, args.repeats, args.warmup, device, args.clock)
                mb = {key: peak_memory_mb(fn, device) for key, fn in variants.items()}
            bare_ms, bare_mb = ms[("bare sdpa", None)], mb[("bare sdpa", None)]
            n, m = q.shape[2], k.shape[2]
            for (backend, topk), t in ms.items():
                gflops = op_flops(1, shape["heads"], n, m, topk or 0) / (t * 1e-3) / 1e9
                rows.append(
                    {
                        "imgsz": imgsz, "level": shape["level"], "fine": f"{shape['fine_hw'][0]}x{shape['fine_hw'][1]}",
                        "coarse": f"{coarse_hw[0]}x{coarse_hw[1]}", "heads": shape["heads"], "backend": backend,
                        "topk": topk, "ms": t, "peak_mb": mb[(backend, topk)], "x_sdpa_ms": t / bare_ms,
                        "x_sdpa_mem": mb[(backend, topk)] / bare_mb, "gflops": gflops, "gemm_fraction": gflops / gemm,
                    }
                )  # fmt: skip
            print(f"op {imgsz} {shape['level']}: " + ", ".join(f"{b}/k={t}: {v:.2f} ms" for (b, t), v in ms.items()))
    return rows


def bench_score_step(args, device, dtype) -> list[dict]:
    """Eq. 2 + eq. 3 at the P3 shape of ``args.imgsz`` (80x80 queries over 40x40 keys at 640, 1 head) and batch
    ``args.score_batch``: time and peak memory, and peak memory as a multiple of the dense variant's.

    Variants: the dense matrix (what a plain implementation holds), the fused blocked pass (``naive`` backend), the
    ``sdpa`` backend's path (on CPU the same fused pass; on CUDA the SDPA kernel plus a blocked score pass), and the
    SDPA kernel plus a blocked pass that recomputes the softmax.
    """
    from ...ops import attention, coarse_attention_with_scores, coarse_key_scores
    from ...ops.pyramid_sparse_attention import blocked_attention_with_scores

    (q, k, v, _, _), _ = psa_inputs(args.score_batch, 1, (args.imgsz // 8, args.imgsz // 8), device, dtype)

    def dense():
        probs = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(dim=-1)  # (B, 1, N, M)
        return probs @ v, probs.float().mean(dim=2)

    dense_name = "dense N x M softmax"
    variants = {
        dense_name: dense,
        "blocked fused pass (naive)": lambda: blocked_attention_with_scores(q, k, v),
        "sdpa backend (CPU: the fused blocked pass)": lambda: coarse_attention_with_scores(q, k, v, "sdpa"),
        "SDPA + softmax score pass": lambda: (attention(q, k, v, "sdpa")[0], coarse_key_scores(q, k)),
    }
    with torch.inference_mode():
        ms = time_round_robin(variants, max(2, args.repeats // 3), 1, device, args.clock)
        mb = {name: peak_memory_mb(fn, device) for name, fn in variants.items()}
    print("score step: " + ", ".join(f"{n}: {ms[n]:.1f} ms {mb[n]:.1f} MB" for n in variants))
    return [
        {"variant": n, "batch": args.score_batch, "ms": ms[n], "peak_mb": mb[n], "x_dense_mem": mb[n] / mb[dense_name]}
        for n in variants
    ]
