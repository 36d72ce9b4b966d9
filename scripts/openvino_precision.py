"""What OpenVINO's bf16 default does to YOLO11n-PST (top-k 0 and 8) and stock YOLO12n: outputs and mAP.

OpenVINO's CPU plugin runs bf16 by default on CPUs with native bf16 (AVX512_BF16, AMX). For each model the script
exports OpenVINO with Ultralytics' exporter and reports: the CPU's capabilities and default precision; the output
error against fp32 PyTorch (bus.jpg, zidane.jpg; boxes in units of the input size) at the default, f32 and bf16
precision hints, with the precision each compiled model says it runs; which user setting reaches the model
Ultralytics' AutoBackend compiles; and with ``--data`` the mAP50-95 of ``YOLO(<openvino dir>).val()`` at the default
precision and forced to f32, next to PyTorch fp32 and PyTorch with CPU bf16 autocast on the same weights (what bf16
arithmetic does, measurable on any CPU). See docs/EXPORT.md, "OpenVINO".

    pst-yolo demo  # trains both models offline on generated digits: runs/pst-demo
    python scripts/openvino_precision.py --data runs/pst-demo/data/data.yaml --imgsz 128 \\
        --weights runs/pst-demo/runs/yolo11n-pst/weights/best.pt \\
        --baseline-weights runs/pst-demo/runs/yolo12n/weights/best.pt --out runs/openvino-precision
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from export_formats import (  # scripts/export_formats.py, next to this file
    VARIANTS,
    check_args,
    export,
    first_output,
    machine,
    missing_module,
    openvino_runner,
    prepare,
    write_results,
)

from pst_yolo.tools.calibration import max_abs_diff, openvino_compile_config, reference_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=128, help="export and input size (square)")
    p.add_argument("--threads", type=int, default=2, help="OpenVINO inference threads for the output errors")
    p.add_argument("--weights", type=Path, help="trained YOLO11n-PST checkpoint (default: BN-calibrated YAML)")
    p.add_argument("--baseline-weights", type=Path, help="trained YOLO12n checkpoint (default: BN-calibrated YAML)")
    p.add_argument("--data", type=Path, help="data YAML: adds the mAP50-95 comparison (needs trained weights)")
    p.add_argument("--out", type=Path, default=Path("runs/openvino-precision"), help="exports, .md and .json")
    args = check_args(p, p.parse_args(argv))
    if missing_module("openvino"):
        p.error(f"needs OpenVINO ({missing_module('openvino')}): pip install openvino")
    return args


def study(args: argparse.Namespace, checkpoints: dict, images: list) -> dict:
    """OpenVINO default / f32 / bf16 precision: effective precision, output errors and (with --data) mAP50-95."""
    import openvino as ov
    import torch
    from ultralytics import YOLO

    from pst_yolo import set_topk

    core = ov.Core()
    study = {
        "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
        "errors": {},
        "map50_95": {},
    }
    folder = args.out / "openvino-precision"
    for v, (m, k) in VARIANTS.items():
        name = v.lower().replace(" ", "").replace("=", "")
        path = export(checkpoints[m], "openvino", k, args.imgsz, folder, name)
        if "autobackend_reach" not in study:
            study["autobackend_reach"] = autobackend_reach(path)
        reference = reference_model(checkpoints[m], k)
        with torch.no_grad():
            expected = [first_output(reference(x)) for x in images]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = [first_output(reference(x)) for x in images]
        errors = {
            "PyTorch bf16 autocast": max(max_abs_diff(a, b, "detect", args.imgsz) for a, b in zip(expected, bf16))
        }
        for hint in (None, "f32", "bf16"):
            run, effective = openvino_runner(path, args.threads, hint)
            error = max(max_abs_diff(a, first_output(run(x)), "detect", args.imgsz) for a, x in zip(expected, images))
            errors[f"OpenVINO hint={hint or 'default'} (runs {effective})"] = error
        study["errors"][v] = errors
        print(f"[openvino-precision] {v}: {errors}", flush=True)
        if args.data:
            val = {"data": str(args.data), "imgsz": args.imgsz, "batch": 1, "plots": False, "verbose": False}
            val["project"], val["name"] = str(folder / "val"), name
            maps = {"OpenVINO default (yolo val)": YOLO(str(path), task="detect").val(**val).box.map}
            with openvino_compile_config(INFERENCE_PRECISION_HINT="f32"):
                maps["OpenVINO forced f32"] = YOLO(str(path), task="detect").val(**val).box.map
            pytorch = YOLO(str(checkpoints[m]))
            if k is not None:
                set_topk(pytorch.model, k)
            maps["PyTorch fp32"] = pytorch.val(**val).box.map
            with bf16_forward(pytorch.model):
                maps["PyTorch bf16 autocast"] = pytorch.val(**val).box.map
            study["map50_95"][v] = {key: float(value) for key, value in maps.items()}
            print(f"[openvino-precision] {v} mAP50-95: {study['map50_95'][v]}", flush=True)
    return study


def autobackend_reach(path: Path) -> dict:
    """Which user setting reaches the model Ultralytics' AutoBackend compiles, seen on a property every CPU honours.

    INFERENCE_NUM_THREADS=1 is requested (a) on another ``ov.Core()`` before AutoBackend loads, (b) by
    :func:`openvino_compile_config`; the compiled model's own INFERENCE_NUM_THREADS shows whether it arrived.
    """
    import openvino as ov
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    def compiled_threads() -> int:
        backend = AutoBackend(str(path), device=torch.device("cpu"), verbose=False).backend
        return int(backend.ov_compiled_model.get_property("INFERENCE_NUM_THREADS"))

    reach = {"AutoBackend as is": compiled_threads()}
    other_core = ov.Core()
    other_core.set_property("CPU", {"INFERENCE_NUM_THREADS": 1})
    reach["after ov.Core().set_property('CPU', {INFERENCE_NUM_THREADS: 1})"] = compiled_threads()
    with openvino_compile_config(INFERENCE_NUM_THREADS=1):
        reach["inside openvino_compile_config(INFERENCE_NUM_THREADS=1)"] = compiled_threads()
    print(f"[openvino-precision] AutoBackend's compiled INFERENCE_NUM_THREADS: {reach}", flush=True)
    return reach


@contextlib.contextmanager
def bf16_forward(model):
    """Run ``model``'s forward under CPU bf16 autocast, outputs cast back to fp32, inside the block.

    Ultralytics' validator disables autocast around inference outside training, so an outer ``torch.autocast``
    does not reach the model; wrapping the forward does.
    """
    import torch
    from torch.utils._pytree import tree_map

    inner = model.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = inner(*args, **kwargs)
        return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) else t, y)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    checkpoints, images = prepare(args)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine_before": machine()}
    results["openvino_precision"] = study(args, checkpoints, images)
    results["wall_s"] = time.perf_counter() - start
    write_results(
        results, "```json\n" + json.dumps(results["openvino_precision"], indent=2) + "\n```", args, "openvino_precision"
    )
    return results


if __name__ == "__main__":
    main()
