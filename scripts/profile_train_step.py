"""Per-layer forward and backward time of one training iteration, YOLO11n-PST against YOLO12n (issue 14).

The iteration is the benchmark's (``pst_yolo.tools.benchmark.training_iteration``: Ultralytics 8.4's detection
forward, loss and backward; the optimizer step is left out, it is the same per parameter). ``torch.profiler`` times
it; each backward node is charged to the layer whose forward created it (autograd sequence numbers), so a layer's
backward is what its own forward recorded. Also printed: the aten ops by self time, PST minus YOLO12n.

    python scripts/profile_train_step.py                 # 1 thread, batch 8, 320 px, 3 profiled iterations
    python scripts/profile_train_step.py --threads 2 --markdown runs/profile_train.md
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pst_yolo.tools.benchmark import random_detection_batch, training_iteration

BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
LOSS = "loss"  # forward ops outside every layer: the detection loss
ACCUMULATE = "grad accumulation"  # AccumulateGrad nodes: writing each parameter's .grad (no forward op)


def label_layers(model: torch.nn.Module) -> tuple[list, set[str]]:
    """Open a ``record_function`` range named ``"<i> <type>"`` around every top-level layer's forward.

    Returns:
        The hook handles and the range names.
    """
    handles, names = [], set()
    for layer in model.model:
        name = f"{layer.i} {layer.type.split('.')[-1]}"
        names.add(name)

        def enter(module, args, name=name):
            module._profile_range = record_function(name)
            module._profile_range.__enter__()

        def leave(module, args, output):
            module._profile_range.__exit__(None, None, None)

        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    return handles, names


def layer_of(event, layer_names: set[str]) -> str:
    """The layer range an event ran in (its nearest enclosing one), or ``LOSS``."""
    while event is not None:
        if event.name in layer_names:
            return event.name
        event = event.cpu_parent
    return LOSS


def profile_model(name: str, batch: dict, iterations: int) -> tuple[dict, dict]:
    """ms per iteration: {layer: [forward, backward]} and {aten op: self time}.

    Forward: each layer's range (top-level layers never nest); ``LOSS`` gets the top-level forward ops outside every
    layer (the /255 and the loss). Backward: each ``evaluate_function`` node goes to the layer of the forward op with
    its sequence number, AccumulateGrad nodes to ``ACCUMULATE``.
    """
    model, forward_backward, _ = training_iteration(name, batch, torch.device("cpu"), accumulate=1)
    handles, layer_names = label_layers(model)
    for _ in range(2):  # warm-up
        forward_backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            forward_backward()
    for handle in handles:
        handle.remove()
    events = prof.events()
    owner = {}  # autograd sequence number -> layer of the forward op that recorded it
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_PREFIX) and event.fwd_thread == 0:
            owner.setdefault(event.sequence_nr, layer_of(event, layer_names))
    per_layer = defaultdict(lambda: [0.0, 0.0])
    for event in events:
        ms = event.cpu_time_total / 1e3 / iterations
        if event.name in layer_names:
            per_layer[event.name][0] += ms
        elif event.name.startswith(BACKWARD_PREFIX):
            accumulate = event.name.endswith("AccumulateGrad")
            per_layer[ACCUMULATE if accumulate else owner.get(event.sequence_nr, LOSS)][1] += ms
        elif event.cpu_parent is None and event.fwd_thread == 0 and event.name.startswith("aten::"):
            per_layer[LOSS][0] += ms
    ops = {e.key: e.self_cpu_time_total / 1e3 / iterations for e in prof.key_averages() if e.key.startswith("aten::")}
    return dict(per_layer), ops


def layer_table(stock: dict, pst: dict) -> list[tuple]:
    """Rows (layer index, stock name, stock fwd, bwd, PST name, PST fwd, bwd, difference of the sums)."""

    def by_index(table):
        return {(k.split()[0] if k[0].isdigit() else k): (k, *v) for k, v in table.items()}

    a, b = by_index(stock), by_index(pst)
    order = sorted(set(a) | set(b), key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else i))
    rows = []
    for i in order:
        sa, fa, ba = a.get(i, ("-", 0.0, 0.0))
        sb, fb, bb = b.get(i, ("-", 0.0, 0.0))
        stock_name, pst_name = (n.split(" ", 1)[-1] if i.isdigit() else "" for n in (sa, sb))
        rows.append((i, stock_name, fa, ba, pst_name, fb, bb, (fb + bb) - (fa + ba)))
    return rows


def markdown(rows: list[tuple], ops: list[tuple], header: str) -> str:
    lines = [header, "", "| layer | YOLO12n | fwd ms | bwd ms | YOLO11n-PST | fwd ms | bwd ms | PST - YOLO12n ms |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:+.1f} |"
              for r in rows]  # fmt: skip
    total = [sum(r[k] for r in rows) for k in (2, 3, 5, 6, 7)]
    lines.append(f"| total | | {total[0]:.1f} | {total[1]:.1f} | | {total[2]:.1f} | {total[3]:.1f} | {total[4]:+.1f} |")
    lines += ["", "| aten op (self time) | YOLO12n ms | YOLO11n-PST ms | PST - YOLO12n ms |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {a:.1f} | {b:.1f} | {b - a:+.1f} |" for name, a, b in ops]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--iterations", type=int, default=3, help="profiled iterations per model (after 2 warm-up)")
    parser.add_argument("--ops", type=int, default=12, help="aten ops listed (largest differences either way)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = random_detection_batch(args.batch, args.imgsz, torch.device("cpu"))
    (stock_layers, stock_ops), (pst_layers, pst_ops) = (
        profile_model(name, batch, args.iterations) for name in ("yolo12n", "yolo11n-pst")
    )
    names = sorted(set(stock_ops) | set(pst_ops), key=lambda k: pst_ops.get(k, 0) - stock_ops.get(k, 0))
    names = names[-args.ops :][::-1] + names[: args.ops // 2]
    ops = [(k, stock_ops.get(k, 0.0), pst_ops.get(k, 0.0)) for k in names]
    header = (
        f"Training iteration (forward + loss + backward) per layer, batch {args.batch}, {args.imgsz} px, "
        f"{args.threads} thread(s), mean of {args.iterations} profiled iterations, torch.profiler CPU time"
    )
    text = markdown(layer_table(stock_layers, pst_layers), ops, header)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
