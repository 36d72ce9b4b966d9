"""ONNX Runtime CPU latency of YOLO11n-PST (top-k 0 and 8) against stock YOLO11n and YOLO12n, exported the same way.

Each model is built from its YAML (random weights: latency does not depend on them), exported by Ultralytics'
own exporter (ONNX, static shape, onnxslim), and timed with onnxruntime's CPU provider. Runs are interleaved
(one call of each model per round) so that load on a shared machine hits every model alike; the table reports
medians.

    python scripts/onnx_latency.py --imgsz 640 --rounds 50 --threads 2 --json latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=50, help="timed calls per model (interleaved)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per model first")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def export_onnx(yaml_name: str, topk: int | None, imgsz: int, out_dir: Path) -> Path:
    """Export ``yaml_name`` (random weights) with Ultralytics to ONNX; ``topk`` sets every PSA top-k if given."""
    from ultralytics import YOLO

    from pst_yolo import set_topk

    model = YOLO(yaml_name)
    if topk is not None:
        set_topk(model.model, topk)
    stem = Path(yaml_name).stem + ("" if topk is None else f"-k{topk}")
    path = model.export(format="onnx", imgsz=imgsz, simplify=True, verbose=False)
    return Path(path).replace(out_dir / f"{stem}.onnx")


def time_interleaved(sessions: dict, image, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of each session's ``run`` on ``image``, one call per session per round."""
    times = {name: [] for name in sessions}
    for i in range(warmup + rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": image})
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    import numpy as np
    import onnxruntime as ort

    # yolo11n-pst is the authors' layout: YOLO12n's network with PST in the top-down path, so YOLO12n is listed too.
    models = {"YOLO11n": ("yolo11n.yaml", None), "YOLO12n": ("yolo12n.yaml", None)}
    models.update({f"YOLO11n-PST k={k}": ("yolo11n-pst.yaml", k) for k in (0, 8)})
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(yaml, k, args.imgsz, Path(tmp)) for name, (yaml, k) in models.items()}
        sessions = {
            name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for name, p in paths.items()
        }
        image = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
        times = time_interleaved(sessions, image, args.rounds, args.warmup)
    results = {
        "imgsz": args.imgsz,
        "threads": args.threads,
        "rounds": args.rounds,
        "onnxruntime": ort.__version__,
        "median_ms": {name: statistics.median(t) for name, t in times.items()},
    }
    print(
        f"\nONNX Runtime {ort.__version__} CPU, {args.threads} threads, {args.imgsz}x{args.imgsz}, "
        f"median of {args.rounds} interleaved runs"
    )
    print("| model | median ms | vs YOLO11n |\n|---|---|---|")
    base = results["median_ms"]["YOLO11n"]
    for name, ms in results["median_ms"].items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
