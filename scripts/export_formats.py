"""Every Ultralytics export format that installs here: YOLO11n-PST (top-k 0 and 8) against stock YOLO12n.

For each format whose packages import, the script exports three variants through Ultralytics' own exporter
(``YOLO(...).export(format=...)``, top-k set with ``pst_yolo.set_topk``), runs each in the format's own runtime and
measures (a) the largest |difference| from the fused fp32 PyTorch model on the bundled bus.jpg and zidane.jpg
(boxes in units of the input size, class scores as they are; the "pytorch" row is fp32 against fp64, the rounding
floor any fp32 runtime shares) and (b) CPU latency at batch 1: one format after the other, its variants timed
round-robin (one call each per round), medians, a fixed thread count. Formats that do not install are listed as
skipped with the reason; coreml is converted only (no Linux runtime).

Weights must let the fine attention act: ``--weights``/``--baseline-weights`` (trained checkpoints) if given, else
each model is built from its YAML with convs re-initialised and BatchNorm statistics calibrated on the two images
(``pst_yolo.tools.calibration``: random weights in eval mode shrink deep features to ~1e-7 and hide the fine branch).

What OpenVINO's bf16 default does, and how to force f32: docs/EXPORT.md, "OpenVINO".

    python scripts/export_formats.py --imgsz 640 --rounds 20 --threads 2 --out runs/export-formats
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

# format -> modules its export and runtime import (Ultralytics 8.4's exporter and AutoBackend)
FORMATS = {
    "torchscript": ("torch",),
    "onnx": ("onnx", "onnxruntime"),
    "openvino": ("openvino",),
    "mnn": ("MNN",),
    "paddle": ("paddle", "x2paddle"),
    "ncnn": ("ncnn", "pnnx"),
    "tflite": ("litert_torch", "ai_edge_litert"),
    "saved_model": ("tensorflow", "onnx2tf"),
    "coreml": ("coremltools",),  # conversion only: Core ML runs on Apple platforms
}
CONVERSION_ONLY = {"coreml"}
VARIANTS = {"YOLO11n-PST k=0": ("pst", 0), "YOLO11n-PST k=8": ("pst", 8), "YOLO12n": ("baseline", None)}
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="formats to try")
    p.add_argument("--imgsz", type=int, default=640, help="export and input size (square)")
    p.add_argument("--rounds", type=int, default=20, help="timed calls per variant (interleaved); fewer = faster")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    p.add_argument("--weights", type=Path, help="trained YOLO11n-PST checkpoint (default: BN-calibrated YAML)")
    p.add_argument("--baseline-weights", type=Path, help="trained YOLO12n checkpoint (default: BN-calibrated YAML)")
    p.add_argument("--out", type=Path, default=Path("runs/export-formats"), help="exports, table.md, results.json")
    return check_args(p, p.parse_args(argv))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Exit with a message for a missing file or a non-positive size, round or thread count."""
    for option in ("weights", "baseline_weights", "data"):
        path = getattr(args, option, None)
        if path is not None and not path.is_file():
            parser.error(f"--{option.replace('_', '-')} {path}: no such file")
    if min(args.imgsz, getattr(args, "rounds", 1), args.threads) < 1 or getattr(args, "warmup", 0) < 0:
        parser.error("--imgsz, --rounds and --threads must be >= 1, --warmup >= 0")
    return args


def missing_module(fmt: str) -> str | None:
    """The first module format ``fmt`` needs that does not import, or None."""
    for name in FORMATS[fmt]:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  an installed package can fail at import (ABI, numpy pins): say why
            return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def first_output(y):
    """First output of a model or runtime call, as a float64 numpy array."""
    import numpy as np
    import torch

    while isinstance(y, (list, tuple, dict)):
        y = next(iter(y.values())) if isinstance(y, dict) else y[0]
    return (y.detach().float().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype(np.float64)


def export(checkpoint: Path, fmt: str, k: int | None, imgsz: int, folder: Path, name: str) -> Path:
    """Export a copy ``folder/name.pt`` of ``checkpoint`` to ``fmt`` with Ultralytics (top-k ``k`` unless None)."""
    from ultralytics import YOLO

    from pst_yolo import set_topk

    folder.mkdir(parents=True, exist_ok=True)
    weights = Path(shutil.copyfile(checkpoint, folder / f"{name}.pt"))
    model = YOLO(str(weights))
    if k is not None:
        set_topk(model.model, k)
    if fmt == "saved_model":  # Ultralytics downloads onnx2tf's calibration sample into the cwd unless it is there
        write_onnx2tf_calibration_sample(folder / ONNX2TF_SAMPLE)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return Path(model.export(format=fmt, imgsz=imgsz, verbose=False)).resolve()
    finally:
        os.chdir(cwd)


def write_onnx2tf_calibration_sample(path: Path) -> None:
    """onnx2tf's calibration sample, (20, 128, 128, 3) float32 in [0, 1], made from the bundled images (offline)."""
    import numpy as np
    import torch

    from pst_yolo.tools.calibration import BUNDLED_IMAGES, letterboxed

    if not path.exists():
        sample = torch.cat([letterboxed(name, (128, 128)) for name in BUNDLED_IMAGES]).permute(0, 2, 3, 1)
        np.save(path, sample.repeat(10, 1, 1, 1).numpy())


def openvino_runner(path: Path, threads: int, precision: str | None = None):
    """OpenVINO CPU: the compile config of Ultralytics' AutoBackend plus a thread count (and a precision hint).

    Returns:
        (run, effective precision the compiled model reports).
    """
    import openvino as ov

    xml = path if path.suffix == ".xml" else next(path.glob("*.xml"))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    return (lambda x: compiled(x.numpy())[0]), compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def runner(fmt: str, path: Path, threads: int):
    """A callable (1, 3, H, W) torch tensor -> first output, in ``fmt``'s own runtime with ``threads`` threads.

    Returns:
        (run, note): note says what the runtime was given beyond the defaults.
    """
    import torch

    if fmt == "torchscript":
        module = torch.jit.load(str(path)).eval()
        return (lambda x: module(x)), "torch.jit, torch.set_num_threads"
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()  # a pool of its own: a shared pool would break later exports (onnxslim)
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda x: session.run(None, {name: x.numpy()})[0]), "CPUExecutionProvider"
    if fmt == "openvino":
        run, precision = openvino_runner(path, threads)
        return run, f"CPU, LATENCY, default precision -> {precision}"
    if fmt == "mnn":
        from ultralytics.utils.files import import_execstack

        mnn = import_execstack("MNN", "_mnncengine*.so", "_tools*.so")  # what AutoBackend does
        config = {"precision": "low", "backend": "CPU", "numThread": threads}  # AutoBackend's precision
        net = mnn.nn.load_module_from_file(
            str(path), [], [], runtime_manager=mnn.nn.create_runtime_manager((config,)), rearrange=True
        )
        return (lambda x: net.onForward([mnn.expr.const(x.data_ptr(), x.shape)])[0].read().copy()), "precision=low"
    # paddle, ncnn, tflite, saved_model: Ultralytics' AutoBackend (its own thread count; LiteRT's is patched)
    from ultralytics.nn import autobackend
    from ultralytics.nn.backends import litert

    litert.NUM_THREADS = threads
    backend = autobackend.AutoBackend(str(path), device=torch.device("cpu"), fp16=False)
    if fmt == "ncnn":  # read by every extractor AutoBackend creates per call
        backend.backend.net.opt.num_threads = threads
        return (lambda x: backend(x)), "AutoBackend, ncnn net.opt.num_threads"
    return (lambda x: backend(x)), "AutoBackend (its own thread count, except LiteRT's)"


def format_table(results: dict) -> str:
    """The format x variant table as Markdown: max error vs fp32 PyTorch and median latency."""
    lines = [
        (
            "| format | PST k=0 error | PST k=8 error | YOLO12n error | PST k=0 ms | PST k=8 ms | YOLO12n ms "
            "| k=0 / YOLO12n | k=8 / YOLO12n |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, row in results["formats"].items():
        if "skipped" in row:
            lines.append(f"| {fmt} | skipped: {row['skipped'].split(':')[0]}) | | | | | | | |")
            continue
        cells = ["pytorch (fp32 vs fp64)" if fmt == "pytorch" else fmt]
        for key in ("error", "ms"):
            for v in VARIANTS:
                cell = row[v]
                if "failed" in cell:
                    cells.append(f"fails ({cell['failed'].split(':')[0]}, see JSON)" if key == "error" else "–")
                elif key == "error":
                    cells.append("converts" if cell.get("converted") else f"{cell['error']:.1e}")
                else:
                    cells.append(f"{cell['ms']:.1f}" if "ms" in cell else "–")
        base = row["YOLO12n"].get("ms")
        for v in list(VARIANTS)[:2]:
            ms = row[v].get("ms")
            cells.append(f"{ms / base:.2f}x" if ms and base else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_formats(args: argparse.Namespace, checkpoints: dict, images: list) -> dict:
    """Export, compare and time every requested format; return the per-format results."""
    import torch

    from pst_yolo.tools.bench.timing import time_round_robin
    from pst_yolo.tools.calibration import max_abs_diff, reference_model

    torch.set_num_threads(args.threads)
    references = {v: reference_model(checkpoints[m], k) for v, (m, k) in VARIANTS.items()}
    with torch.no_grad():
        expected = {v: [first_output(references[v](x)) for x in images] for v in VARIANTS}
    formats, runs = {"pytorch": {}}, {}
    for v in VARIANTS:  # the reference's own rounding: fp32 eager against the same model in fp64
        fp64 = reference_model(checkpoints[VARIANTS[v][0]], VARIANTS[v][1]).double()
        with torch.no_grad():
            error = max(
                max_abs_diff(first_output(fp64(x.double())), y, "detect", args.imgsz)
                for x, y in zip(images, expected[v])
            )
        formats["pytorch"][v] = {"error": error, "note": "fused fp32 eager (the reference) against fp64"}
        runs[("pytorch", v)] = references[v]
    for fmt in args.formats:
        reason = missing_module(fmt)
        if reason:
            formats[fmt] = {"skipped": f"not installed ({reason})"}
            print(f"[export_formats] {fmt}: skipped, {reason}", flush=True)
            continue
        formats[fmt] = {}
        for v, (m, k) in VARIANTS.items():
            name = v.lower().replace(" ", "").replace("=", "")
            cell = formats[fmt][v] = {}
            try:
                path = export(checkpoints[m], fmt, k, args.imgsz, args.out / "exports" / fmt, name)
                cell["path"] = str(path)
                if fmt in CONVERSION_ONLY:
                    cell["converted"] = True
                    continue
                run, cell["note"] = runner(fmt, path, args.threads)
                with torch.inference_mode():
                    cell["error"] = max(
                        max_abs_diff(ref, first_output(run(x)), "detect", args.imgsz)
                        for ref, x in zip(expected[v], images)
                    )
                runs[(fmt, v)] = run
            except Exception as e:  # noqa: BLE001  a format failing for one variant is a result, not a crash
                cell["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"[export_formats] {fmt} {v}: {cell}", flush=True)
    print(f"[export_formats] timing {len(runs)} runtimes x {args.rounds} rounds", flush=True)
    # One format at a time, its variants round-robin: a runtime's worker threads spin for more work after each call,
    # so in one loop over every runtime each call ran against the previous runtime's spinning workers (with 2
    # threads, ONNX Runtime ran YOLO12n 3x slower than alone; docs/DESIGN.md, "Performance findings").
    # Within a format the variants still spin against each other (ONNX Runtime: one pool per session, see runner).
    with torch.inference_mode():
        for fmt in formats:
            calls = {v: functools.partial(run, images[0]) for (f, v), run in runs.items() if f == fmt}
            for v, ms in time_round_robin(calls, args.rounds, args.warmup, torch.device("cpu")).items():
                formats[fmt][v]["ms"] = ms
    fine = {
        "max |k=8 - k=0| PyTorch": max(
            max_abs_diff(a, b, "detect", args.imgsz)
            for a, b in zip(expected["YOLO11n-PST k=8"], expected["YOLO11n-PST k=0"])
        )
    }
    return {"formats": formats, "fine_branch": fine}


def machine() -> dict:
    """What the numbers depend on: CPU, load, versions."""
    import torch
    import ultralytics

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "uptime": subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "python": platform.python_version(),
    }


def prepare(args: argparse.Namespace) -> tuple[dict, list]:
    """Offline Ultralytics, ``args.out`` created; return the checkpoints (given or calibrated) and the two images."""
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    import torch

    from pst_yolo.tools.calibration import BUNDLED_IMAGES, calibrated_checkpoint, letterboxed

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    images = [letterboxed(name, (args.imgsz, args.imgsz)) for name in BUNDLED_IMAGES]
    batch = torch.cat(images)
    checkpoints = {
        "pst": args.weights or calibrated_checkpoint("yolo11n-pst.yaml", batch, args.out / "yolo11n-pst-calibrated.pt"),
        "baseline": args.baseline_weights
        or calibrated_checkpoint("yolo12n.yaml", batch, args.out / "yolo12n-calibrated.pt"),
    }
    return checkpoints, images


def write_results(results: dict, body: str, args: argparse.Namespace, stem: str) -> None:
    """Add the machine's state after the run, write ``stem``.md / .json to ``args.out`` and print the Markdown."""
    results["machine_after"] = machine()
    before, after = results["machine_before"], results["machine_after"]
    text = "\n".join([
        f"Machine: {before['cpu']}, {before['cores']} cores; load before: {before['uptime']}; after: {after['uptime']}",
        f"torch {before['torch']}, ultralytics {before['ultralytics']}; {args.imgsz} px, batch 1, {args.threads} "
        + f"threads; wall {results['wall_s']:.0f} s",
        "",
        body,
    ])  # fmt: skip
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + text)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    checkpoints, images = prepare(args)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine_before": machine()}
    results.update(measure_formats(args, checkpoints, images))
    results["wall_s"] = time.perf_counter() - start
    body = f"Median of {args.rounds} interleaved rounds.\n\n{format_table(results)}\n\n"
    write_results(results, body + f"Fine branch visible: {results['fine_branch']}", args, "table")
    return results


if __name__ == "__main__":
    main()
