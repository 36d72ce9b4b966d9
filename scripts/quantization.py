"""INT8 and fp16 retention of trained YOLO11n-PST (top-k 0 and 8) and YOLO12n, per runtime: docs/QUANTIZATION.md.

For each model variant the script exports fp32, INT8 (``quantize=8``) and fp16 (``quantize=16``) through Ultralytics'
own exporter to every format here whose runtime runs on this CPU (ONNX Runtime; OpenVINO, INT8 through NNCF),
validates each with ``YOLO(export).val`` on the same images (square letterbox, ``rect=False``, as the exports take
them) and reports:

- mAP50-95 and its ratio to fp32 PyTorch, with a 95% paired bootstrap interval of the difference (the same resampled
  images for every run: ``pst_yolo.tools.topk_evidence``);
- top-k agreement (PST k=8): the share of the coarse tokens fp32 PyTorch selects that the export selects too, per
  (image, PSA layer, head), read from the graph's TopK indices (added as outputs);
- INT8 of PST k=8 twice: as pst-yolo exports it (the PST rows' attention kept float, ``pst_yolo.int8_export``) and
  with the attention quantized too (before that module);
- CPU latency at batch 1: fp32 and the quantized export of one runtime timed round-robin, medians.

INT8 calibration reads ``--calibration-split`` of ``--data`` (default: train), so validation images are not
calibration images. OpenVINO runs with ``INFERENCE_PRECISION_HINT=f32`` for validation (its bf16 default on CPUs with
native bf16 would add its own error, docs/EXPORT.md); timing uses Ultralytics' own compile config.

    python scripts/quantization.py                       # the checkpoints `pst-yolo demo` writes, docs/QUANTIZATION.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_formats import machine, runner  # noqa: E402  (the sibling script's runtimes and machine description)

DEMO = Path("runs/pst-demo")
# variant: (checkpoint, top-k, PST attention kept float in INT8 (pst_yolo.int8_export), precisions measured)
VARIANTS = {
    "YOLO11n-PST k=0": ("pst", 0, True, ("fp32", "INT8", "fp16")),
    "YOLO11n-PST k=8": ("pst", 8, True, ("fp32", "INT8", "fp16")),
    "YOLO11n-PST k=8, attention INT8": ("pst", 8, False, ("fp32", "INT8")),  # before pst_yolo.int8_export
    "YOLO12n": ("baseline", None, True, ("fp32", "INT8", "fp16")),
}
PRECISIONS = {"fp32": None, "INT8": 8, "fp16": 16}
FORMATS = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}
METRIC = "mAP50-95"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=DEMO / "runs/yolo11n-pst/weights/best.pt", help="YOLO11n-PST")
    p.add_argument("--baseline-weights", type=Path, default=DEMO / "runs/yolo12n/weights/best.pt", help="YOLO12n")
    p.add_argument("--data", type=Path, default=DEMO / "data/data.yaml", help="data.yaml: validation + calibration")
    p.add_argument("--calibration-split", default="train", help="split of --data that INT8 calibration reads")
    p.add_argument("--imgsz", type=int, default=128, help="export and validation size (the demo trains at 128)")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per runtime (interleaved)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per runtime first")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--out", type=Path, default=Path("runs/quantization"), help="exports and results.json")
    p.add_argument("--doc", type=Path, default=Path("docs/QUANTIZATION.md"), help="page whose table is rewritten")
    args = p.parse_args(argv)
    for option in ("weights", "baseline_weights", "data"):
        if not getattr(args, option).is_file():
            p.error(f"--{option.replace('_', '-')} {getattr(args, option)}: no such file (run `pst-yolo demo` first)")
    return args


def export(args, checkpoint: Path, fmt: str, quantize: int | None, k: int | None, name: str) -> Path:
    """Export a copy of ``checkpoint`` to ``fmt`` at precision ``quantize`` with top-k ``k`` (None: the model's)."""
    from ultralytics import YOLO

    from pst_yolo import set_topk

    folder = args.out / "exports" / f"{name}-{fmt}-{quantize or 32}"
    folder.mkdir(parents=True, exist_ok=True)
    model = YOLO(shutil.copyfile(checkpoint, folder / f"{name}.pt"))
    if k is not None:
        set_topk(model.model, k)
    kwargs = {"data": str(args.data), "split": args.calibration_split} if quantize == 8 else {}
    return Path(model.export(format=fmt, imgsz=args.imgsz, quantize=quantize, verbose=False, **kwargs)).resolve()


def validate(args, weights: str | Path, k: int | None):
    """``YOLO(weights).val`` on ``--data`` with per-image statistics recorded; returns (headline metrics, stats)."""
    from ultralytics import YOLO

    from pst_yolo import set_topk
    from pst_yolo.tools.calibration import openvino_compile_config
    from pst_yolo.tools.topk_evidence import PerImageRecorder

    model = YOLO(str(weights), task="detect")
    if k is not None and str(weights).endswith(".pt"):
        set_topk(model.model, k)
    recorder = PerImageRecorder().attach(model)
    with openvino_compile_config(INFERENCE_PRECISION_HINT="f32"):
        metrics = model.val(data=str(args.data), imgsz=args.imgsz, batch=1, rect=False, plots=False, verbose=False,
                            workers=0, project=str(args.out / "val"), name="run", exist_ok=True)  # fmt: skip
    return {"mAP50": float(metrics.box.map50), METRIC: float(metrics.box.map)}, recorder.runs[-1]


def val_images(args) -> list:
    """The validation images letterboxed to imgsz as the exports take them: each (1, 3, imgsz, imgsz)."""
    from ultralytics.data.utils import check_det_dataset

    from pst_yolo.tools.calibration import letterboxed_files

    folder = Path(check_det_dataset(str(args.data))["val"])
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})
    return [letterboxed_files([f], (args.imgsz, args.imgsz)) for f in files]


def torch_selections(checkpoint: Path, k: int, images: list) -> list[list]:
    """fp32 PyTorch's top-k coarse indices: per image, per PSA call, a (1, heads, k) int array."""
    import importlib

    import torch

    from pst_yolo.tools.calibration import reference_model

    psa = importlib.import_module("pst_yolo.ops.pyramid_sparse_attention")  # the module, not the function it exports

    model, calls, original = reference_model(checkpoint, k), [], psa._select_fine_tokens

    def recording(scores, fine_hw, coarse_hw, topk, threshold):
        calls.append(scores.topk(min(topk, scores.shape[-1]), dim=-1).indices.numpy())
        return original(scores, fine_hw, coarse_hw, topk, threshold)

    psa._select_fine_tokens, selections = recording, []
    try:
        with torch.no_grad():
            for x in images:
                calls.clear()
                model(x)
                selections.append(list(calls))
    finally:
        psa._select_fine_tokens = original
    return selections


def export_selections(fmt: str, path: Path, images: list) -> list[list]:
    """The export's TopK indices, its TopK nodes made graph outputs: per image, per TopK in graph order, (1, h, k)."""
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        names = [node.output[1] for node in model.graph.node if node.op_type == "TopK"]
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None) for n in names)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        return [session.run(names, {feed: x.numpy()}) for x in images]
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(next(path.glob("*.xml"))))
    added = len(model.add_outputs([op.output(1) for op in model.get_ordered_ops() if op.get_type_name() == "TopK"]))
    compiled, first = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), len(model.outputs) - added
    return [[result[i] for i in range(first, first + added)] for result in (compiled(x.numpy()) for x in images)]


def agreement(reference: list[list], export: list[list]) -> float | None:
    """Mean share of each (image, layer, head)'s reference top-k that the export selects too; None if the calls do
    not pair up (a different number or shape of selections)."""
    import numpy as np

    shares = []
    for ref_calls, out_calls in zip(reference, export):
        if len(ref_calls) != len(out_calls) or any(a.shape != b.shape for a, b in zip(ref_calls, out_calls)):
            return None
        for a, b in zip(ref_calls, out_calls):
            for ref_row, out_row in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
                shares.append(len(set(ref_row.tolist()) & set(out_row.tolist())) / len(ref_row))
    return float(np.mean(shares))


def time_runtime(fmt: str, paths: dict[str, Path], threads: int, image, rounds: int, warmup: int) -> dict:
    """Median ms per call of each precision's export in ``fmt``'s runtime, round-robin (load hits all alike)."""
    import functools

    import torch

    from pst_yolo.tools.bench.timing import time_round_robin

    calls = {precision: functools.partial(runner(fmt, path, threads)[0], image) for precision, path in paths.items()}
    with torch.inference_mode():
        return time_round_robin(calls, rounds, warmup, torch.device("cpu"))


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def measure_variant(args, checkpoint: Path, k: int | None, name: str, images: list, precisions) -> list[dict]:
    """Every runtime and each of ``precisions`` of one model variant: metrics, bootstrap comparison to fp32 PyTorch,
    top-k agreement (k > 0), latency. Returns one row per (runtime, precision), fp32 PyTorch first."""
    from pst_yolo.tools.topk_evidence import Comparison, paired_bootstrap

    metrics, stats = validate(args, checkpoint, k)
    rows, runs = [{"runtime": "PyTorch", "precision": "fp32", **metrics}], {0: stats}
    reference = torch_selections(checkpoint, k, images) if k else None
    for fmt, runtime in FORMATS.items():
        paths = {}
        for precision in precisions:
            quantize, row = PRECISIONS[precision], {"runtime": runtime, "precision": precision}
            rows.append(row)
            try:
                paths[precision] = export(args, checkpoint, fmt, quantize, k, name)
                metrics, runs[len(rows) - 1] = validate(args, paths[precision], k)
                row.update(metrics, path=str(paths[precision]))
                if reference is not None:
                    row["topk_agreement"] = agreement(reference, export_selections(fmt, paths[precision], images))
            except Exception as e:  # noqa: BLE001  a failing export or runtime is a result, not a crash
                row["failed"] = failure(e)
            print(f"[quantization] {name} {runtime} {precision}: {row}", flush=True)
        for precision, ms in time_runtime(fmt, paths, args.threads, images[0], args.rounds, args.warmup).items():
            next(r for r in rows if r["runtime"] == runtime and r["precision"] == precision)["ms"] = ms
    samples = paired_bootstrap(runs, args.resamples, seed=0)
    for index, run_samples in samples.items():
        if index:
            diff = rows[index][METRIC] - rows[0][METRIC]
            rows[index]["vs_fp32"] = Comparison.of(diff, run_samples[METRIC] - samples[0][METRIC]).to_json()
    return rows


def format_table(results: dict) -> str:
    """Markdown: one row per variant, runtime and precision."""
    lines = ["| model | runtime | precision | mAP50-95 | / fp32 PyTorch | difference [95% interval] | top-k agreement "
             "| ms | ms fp32 (same runtime) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant, rows in results["variants"].items():
        reference = rows[0][METRIC]
        for row in rows:
            fp32_ms = next((r.get("ms") for r in rows if r["runtime"] == row["runtime"] and r["precision"] == "fp32"))
            cells = [variant, row["runtime"], row["precision"]]
            if "failed" in row:
                cells += [f"fails: {row['failed']}"] + [""] * 5
            else:
                vs = row.get("vs_fp32")
                interval = f"{vs['diff']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}]" if vs else "reference"
                share = row.get("topk_agreement")
                cells += [f"{row[METRIC]:.4f}", f"{row[METRIC] / reference:.3f}", interval,
                          "" if share is None else f"{share:.3f}", f"{row['ms']:.2f}" if "ms" in row else "–",
                          f"{fp32_ms:.2f}" if fp32_ms else "–"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


START, END = "<!-- quantization-table:start -->", "<!-- quantization-table:end -->"


def write_doc(path: Path, results: dict, args, command: str) -> None:
    """Replace the generated block of ``path`` (between START and END) with the command, machine and table."""
    m = results["machine"]
    block = "\n".join([
        START,
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {args.threads} threads; torch {m['torch']}, ultralytics "
        f"{m['ultralytics']}, onnxruntime {m['onnxruntime']}, openvino {m['openvino']}, nncf {m['nncf']}; "
        f"{results['images']} validation images at {args.imgsz} px; latency: median of {args.rounds} interleaved "
        f"rounds at batch 1; bootstrap: {args.resamples} paired resamples of the validation images; "
        f"wall {results['wall_s']:.0f} s.",
        "",
        format_table(results),
        END,
    ])  # fmt: skip
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} block to rewrite")
    path.write_text(text[: text.index(START)] + block + text[text.index(END) + len(END) :])


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    args = parse_args(argv)
    import nncf
    import onnxruntime
    import openvino
    import torch

    from pst_yolo import int8_export

    torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    start, images = time.perf_counter(), val_images(args)
    checkpoints = {"pst": args.weights.resolve(), "baseline": args.baseline_weights.resolve()}
    versions = {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__}
    results = {"machine": {**machine(), **versions}, "images": len(images), "variants": {}}
    for variant, (model, k, attention_float, precisions) in VARIANTS.items():
        name = re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")
        int8_export.KEEP_ATTENTION_FLOAT = attention_float
        try:
            results["variants"][variant] = measure_variant(args, checkpoints[model], k, name, images, precisions)
        finally:
            int8_export.KEEP_ATTENTION_FLOAT = True
    results["wall_s"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    command = "python scripts/quantization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_doc(args.doc, results, args, command.strip())
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
