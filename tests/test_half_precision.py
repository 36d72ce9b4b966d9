"""Half precision: the op in float16/bfloat16, and YOLOv11-PST-N under CPU autocast against float32.

Op: flash-attention's rule (tests/psa_precision.py) for both coarse passes and both CPU backends. Model: the shipped
``yolo11n-pst.yaml`` with BatchNorm calibrated on Ultralytics' two bundled images (``wake_up`` of test_export: a
random-init model in eval mode would shrink deep features to ~1e-7 and hide the fine branch), run in float32 and
under ``torch.autocast("cpu", dtype)``. Measured: how often the top-k selection of each PSA layer changes, and what
that alone does to the output (the float32 model replaying the low-precision selection). Run with ``-s`` to print.
"""

import importlib

import pytest
import torch
from psa_precision import calibrated_yolo11n_pst, output_difference, precision_errors, selected_sets, selection_change
from test_ops import SHAPES, random_inputs

from pst_yolo import set_topk
from pst_yolo.ops import pyramid_sparse_attention

psa_ops = importlib.import_module("pst_yolo.ops.pyramid_sparse_attention")  # the module, not the same-named op
HALF = [torch.float16, torch.bfloat16]
IMGSZ = 160  # P3 PSA: 20x20 queries over 10x10 keys; P4: 10x10 over 5x5


@pytest.mark.parametrize("coarse_pass", ["fused", "kernel"])
@pytest.mark.parametrize("topk", [0, 8])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_op_in_half_precision(coarse_pass, topk, dtype, B, heads, fine_hw, coarse_hw):
    """SDPA backend (the ``naive`` one in half precision: ``pst-yolo check --parts backends``)."""
    backend = "sdpa"
    inputs = [t.to(dtype) for t in random_inputs(B, heads, fine_hw, coarse_hw)]
    out = pyramid_sparse_attention(*inputs, fine_hw, coarse_hw, topk=topk, backend=backend, coarse_pass=coarse_pass)
    error, plain_error = precision_errors(out, inputs, fine_hw, coarse_hw, topk)
    assert out.dtype == dtype and error <= 2 * plain_error, f"{error:.2e} vs plain PyTorch {plain_error:.2e}"


@pytest.mark.parametrize("dtype", HALF)
def test_op_selection_changes_only_at_near_ties(dtype):
    """Unsharpened random inputs (many close scores): computing eq. 3 in half precision may change a top-k set, but
    only where the float64 scores (same rounded inputs) of the last kept and first dropped token differ by less than
    the precision's unit roundoff (relative)."""
    q, k, *_ = (t.to(dtype) for t in random_inputs(32, 4, (20, 20), (10, 10), seed=3))
    q = q / 2  # undo random_inputs' sharpening: scores close together
    low, exact = selected_sets(q, k, 8), selected_sets(q.double(), k.double(), 8)
    sets_changed, tokens_changed = selection_change(low, exact)
    print(
        f"\nop {str(dtype)[6:]}: top-8 set changed in {sets_changed:.1%} of (batch, head), {tokens_changed:.1%} tokens"
    )
    scores = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 32**0.5, dim=-1).mean(dim=2)
    ranked = scores.sort(dim=-1, descending=True).values
    relative_gap = (ranked[..., 7] - ranked[..., 8]) / ranked[..., 7]  # (B, h)
    eps = torch.finfo(dtype).eps
    for b, (rows_low, rows_exact) in enumerate(zip(low, exact)):
        for h, (a, e) in enumerate(zip(rows_low, rows_exact)):
            if a != e:
                assert relative_gap[b, h] < eps, f"set changed at a clear gap {relative_gap[b, h] / eps:.2f} eps"


def run_model(model, x, topk, monkeypatch, dtype=None, replay=None):
    """Raw detection output (B, 4 + nc, anchors) in float32 and each PSA layer's (index, valid) selection.

    With ``replay`` (selections of an earlier run) the PSA layers use those instead of their own.
    """
    calls, select = [], psa_ops._select_fine_tokens

    def recording(scores, *args):
        chosen = select(scores, *args) if replay is None else replay[len(calls)]
        calls.append(chosen)
        return chosen

    set_topk(model, topk)
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(psa_ops, "_select_fine_tokens", recording)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)[0].float()
    return out, calls


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return output_difference(a, b, IMGSZ)


@pytest.fixture(scope="module")
def calibrated_model():
    return calibrated_yolo11n_pst(IMGSZ)


@pytest.mark.parametrize("dtype", HALF)
def test_model_under_autocast(calibrated_model, dtype, monkeypatch):
    model, x = calibrated_model
    out0, _ = run_model(model, x, 0, monkeypatch)
    out8, exact = run_model(model, x, 8, monkeypatch)
    low0, _ = run_model(model, x, 0, monkeypatch, dtype)
    low8, low_sel = run_model(model, x, 8, monkeypatch, dtype)
    replayed, _ = run_model(model, x, 8, monkeypatch, replay=low_sel)  # fp32 model, low-precision selection
    fine_effect, error0, error8 = difference(out8, out0), difference(low0, out0), difference(low8, out8)
    selection_effect = difference(replayed, out8)
    rates = []
    for (idx_a, valid_a), (idx_e, valid_e) in zip(low_sel, exact):
        sets_a = [[set(i[v].tolist()) for i, v in zip(ib, vb)] for ib, vb in zip(idx_a, valid_a)]
        sets_e = [[set(i[v].tolist()) for i, v in zip(ib, vb)] for ib, vb in zip(idx_e, valid_e)]
        rates.append(selection_change(sets_a, sets_e))
    print(
        f"\nyolo11n-pst {IMGSZ}px autocast {str(dtype)[6:]}: k=8 vs k=0 (fp32) {fine_effect:.3f}; error vs fp32 "
        f"k=0 {error0:.4f}, k=8 {error8:.4f}; selection changes per PSA layer (sets, tokens): "
        + ", ".join(f"{s:.1%}/{t:.1%}" for s, t in rates)
        + f"; fp32 model with the {str(dtype)[6:]} selection moves by {selection_effect:.4f}"
    )
    assert len(rates) == 2 and fine_effect > 0.02, "the fine branch must act on calibrated weights"
    assert error0 < 0.2 * fine_effect, "half precision at k=0 stays well below the fine branch's effect"
    assert error8 <= 2 * error0 + selection_effect, "k=8 adds no half-precision error beyond its selection changes"
