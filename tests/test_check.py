"""``pst-yolo check`` on the CPU: the real command with fast options, and its GPU-only parts through the seams.

The CUDA kernels cannot run here; the backend comparison that ``check`` runs on a GPU is run in-process with the
flash/sage stand-ins (tests/standins) and the test-only seam ``kernels_on_any_device``, and the speed part (by
default CUDA only) on the CPU, so the code a GPU run takes has run before it reaches one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from standins import install_standins

from pst_yolo.ops.backends import kernels_on_any_device
from pst_yolo.tools.check import check_backends, check_speed, int8_row, parse_args

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_check_command_cpu_subset(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(
        [str(BIN / "pst-yolo"), "check", "--quick", "--out", str(out)],
        env={**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "cfg")},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "check.md").read_text()
    for part in ("backends", "train", "val", "export"):
        assert f"| {part} | passed |" in report, report
    for skipped in ("speed", "backends on CUDA", "train with AMP", "val half=True", "export TensorRT"):
        assert f"| {skipped} | skipped |" in report, report
    assert "flash_attn" in report and "needs a CUDA GPU" in report
    assert "| onnx | False | 8 |" in report


def test_check_backends_through_standins(monkeypatch):
    install_standins(monkeypatch)
    with kernels_on_any_device():
        part = check_backends(torch.device("cpu"), [torch.float16, torch.bfloat16], backends=("flash", "sage"))
    rows = {
        (r["backend"], r["dtype"], r.get("shape"), r.get("pass"), r.get("topk"), r.get("grad")): r for r in part.rows
    }
    summary = {}
    for r in part.rows:
        if "error" in r:
            key = (r["backend"], r["dtype"], "grad" if r["grad"] else "fwd")
            summary[key] = max(summary.get(key, (0, 0)), (r["error"], r["error"] / r["tolerance"]))
    print(
        "\nstand-ins, max error vs float64 (fraction of tolerance): "
        + ", ".join(f"{b}/{d}/{g} {e:.1e} ({f:.2f})" for (b, d, g), (e, f) in sorted(summary.items()))
    )
    assert part.status == "passed", [r for r in part.rows if r["status"] != "ok"]
    assert rows[("flash", "float16", "2x2x13x13", "kernel", 8, False)]["status"] == "ok"
    assert rows[("flash", "bfloat16", "2x2x13x13", "-", 0, True)]["status"] == "ok"  # flash's backward
    assert rows[("sage", "float16", "1x1x32x32", "kernel", 8, False)]["status"] == "ok"
    assert rows[("sage", "float16", "keys 400", None, None, None)]["status"] == "refused as expected"
    assert not any(r["backend"] == "sage" and r.get("grad") for r in part.rows)  # no backward: never trained with


def test_check_speed_part_on_cpu():
    part = check_speed(parse_args(["--quick"]), torch.device("cpu"))
    ops = [r for r in part.rows if r["what"].startswith("op")]
    models = {r["backend"] for r in part.rows if r["what"].startswith("model")}
    assert {r["backend"] for r in ops} == {"naive", "sdpa"} and all(r["ms"] > 0 for r in part.rows)
    assert {"yolo12n", "yolo11n-pst k=0", "yolo11n-pst k=8"} <= models


def test_int8_export_is_judged_by_the_fine_attention_it_keeps():
    """``pst-yolo check``'s INT8 TensorRT row (CUDA): INT8 noise keeps the k=8 - k=0 move -> ok; an INT8 graph whose
    k=8 output equals its k=0 one (the fine branch lost) -> FAILED."""
    generator = torch.Generator().manual_seed(0)
    fp32 = {0: torch.rand(2, 84, 100, generator=generator)}
    fp32[8] = fp32[0] + 0.05 * torch.randn(2, 84, 100, generator=generator)
    noisy = {k: v + 0.005 * torch.randn(2, 84, 100, generator=generator) for k, v in fp32.items()}
    row = int8_row(noisy, fp32, imgsz=64)
    assert row["status"] == "ok" and row["k=8 - k=0"] > 0.5 * row["fp32 k=8 - k=0"], row
    assert int8_row({0: noisy[0], 8: noisy[0]}, fp32, imgsz=64)["status"] == "FAILED"
