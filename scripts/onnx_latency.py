"""ONNX Runtime CPU latency of YOLO11n-PST (top-k 0 and 8) against stock YOLO11n and YOLO12n, exported the same way.

Each model is built from its YAML (random weights: latency does not depend on them), exported by Ultralytics'
own exporter (ONNX, static shape, onnxslim), and timed with onnxruntime's CPU provider. Runs are interleaved
(one call of each model per round) so that load on a shared machine hits every model alike; the table reports
medians. ``--one-block`` adds YOLO11n-PST exported with each attention call as one MatMul-Softmax-MatMul chain over
the whole N x M logits (what graphs were before ``pst_yolo.ops.backends.traced_query_blocks``). ``--processes N``
times in N fresh processes, one after the other (the graphs are exported once), and reports every process's
medians and the median over processes: on a shared VM a ratio moves more between processes than between rounds.

    python scripts/onnx_latency.py --imgsz 640 --rounds 50 --threads 2 --json latency.json
    python scripts/onnx_latency.py --threads 1 --clock cpu --one-block --processes 3 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=50, help="timed calls per model (interleaved)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per model first")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="wall", help="cpu: process CPU time (1 thread)")
    parser.add_argument("--one-block", action="store_true", help="also YOLO11n-PST with one-block attention graphs")
    parser.add_argument("--processes", type=int, default=1, help="fresh processes to time in, one after the other")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def export_onnx(yaml_name: str, topk: int | None, imgsz: int, out_dir: Path, one_block: bool = False) -> Path:
    """Export ``yaml_name`` (random weights) with Ultralytics to ONNX; ``topk`` sets every PSA top-k if given;
    ``one_block`` traces each attention call as one block (no query blocks)."""
    from ultralytics import YOLO

    from pst_yolo import set_topk
    from pst_yolo.ops import backends

    model = YOLO(yaml_name)
    if topk is not None:
        set_topk(model.model, topk)
    stem = Path(yaml_name).stem + ("" if topk is None else f"-k{topk}") + ("-one-block" if one_block else "")
    block_elements = backends.TRACED_BLOCK_ELEMENTS
    backends.TRACED_BLOCK_ELEMENTS = 1 << 62 if one_block else block_elements
    try:
        path = model.export(format="onnx", imgsz=imgsz, simplify=True, verbose=False)
    finally:
        backends.TRACED_BLOCK_ELEMENTS = block_elements
    return Path(path).replace(out_dir / f"{stem}.onnx")


def time_interleaved(paths: dict[str, Path], imgsz: int, threads: int, rounds: int, warmup: int, clock: str):
    """Median milliseconds of each graph's ``run`` on one random image, one call per graph per round."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from pst_yolo.tools.benchmark import onnx_session_options, time_round_robin

    options = onnx_session_options(threads)  # the sessions share one pool, as one session alone has it
    image = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    calls = {
        name: partial(
            ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run, None, {"images": image}
        )
        for name, p in paths.items()
    }
    return time_round_robin(calls, rounds, warmup, torch.device("cpu"), clock)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    import onnxruntime as ort

    from pst_yolo.tools.benchmark import in_fresh_processes

    # yolo11n-pst is the authors' layout: YOLO12n's network with PST in the top-down path, so YOLO12n is listed too.
    models = {"YOLO11n": ("yolo11n.yaml", None, False), "YOLO12n": ("yolo12n.yaml", None, False)}
    for one_block in (False, True) if args.one_block else (False,):
        suffix = " one block" if one_block else ""
        models.update({f"YOLO11n-PST k={k}{suffix}": ("yolo11n-pst.yaml", k, one_block) for k in (0, 8)})
    timing = (args.imgsz, args.threads, args.rounds, args.warmup, args.clock)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(yaml, k, args.imgsz, Path(tmp), one) for name, (yaml, k, one) in models.items()}
        # one after the other, each spawned fresh: the shared ONNX Runtime pool is made once per process
        runs = in_fresh_processes(args.processes, time_interleaved, paths, *timing)
    median_ms = {name: statistics.median(run[name] for run in runs) for name in models}
    results = {
        "imgsz": args.imgsz, "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
        "onnxruntime": ort.__version__, "median_ms": median_ms, "processes": runs,
    }  # fmt: skip
    print(
        f"\nONNX Runtime {ort.__version__} CPU, {args.threads} threads, {args.clock} clock, {args.imgsz}x{args.imgsz}, "
        f"median of {args.rounds} interleaved runs" + (f", median over {len(runs)} processes" if len(runs) > 1 else "")
    )
    print("| model | median ms | vs YOLO11n | vs YOLO12n |\n|---|---|---|---|")
    for name, ms in median_ms.items():
        print(f"| {name} | {ms:.1f} | {ms / median_ms['YOLO11n']:.3f} | {ms / median_ms['YOLO12n']:.3f} |")
    if len(runs) > 1:
        print("\nPer process (in run order), ratios within the process:")
        for run in runs:
            line = [f"k=0 / YOLO12n {run['YOLO11n-PST k=0'] / run['YOLO12n']:.3f}"]
            line.append(f"k=8 / k=0 {run['YOLO11n-PST k=8'] / run['YOLO11n-PST k=0']:.3f}")
            if args.one_block:
                line.append(f"one block: k=0 / YOLO12n {run['YOLO11n-PST k=0 one block'] / run['YOLO12n']:.3f}")
                line.append(f"k=8 / k=0 {run['YOLO11n-PST k=8 one block'] / run['YOLO11n-PST k=0 one block']:.3f}")
                line.append(f"blocks / one block: k=0 {run['YOLO11n-PST k=0'] / run['YOLO11n-PST k=0 one block']:.3f}")
                line.append(f"k=8 {run['YOLO11n-PST k=8'] / run['YOLO11n-PST k=8 one block']:.3f}")
            print("- " + ", ".join(line))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
