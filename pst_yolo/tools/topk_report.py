"""The table and plot of ``pst-yolo topk``: each k's metrics with their bootstrap intervals, its difference to the
cheapest and to the best k, and its latency with the spread over the timing rounds."""

from __future__ import annotations

from pathlib import Path

from .topk_evidence import CONFIDENCE, Comparison, Evidence
from .topk_latency import Latency, format_ms, format_vs_cheapest

ROW_KEYS = ("k", "fitness", "inference_ms", "total_ms", "val_dir", "intervals", "vs_cheapest", "vs_best", "latency")


def metric_names(rows: list[dict]) -> list[str]:
    """The headline metric names of sweep rows (e.g. ``["mAP50", "mAP50-95"]``)."""
    return [key for key in rows[0] if key not in ROW_KEYS]


def format_interval(value: float, span: tuple[float, float]) -> str:
    """E.g. ``0.4123 [0.3801, 0.4460]``."""
    return f"{value:.4f} [{span[0]:.4f}, {span[1]:.4f}]"


def format_difference(comparison: Comparison) -> str:
    """E.g. ``+0.0004 [-0.0060, +0.0070]``."""
    return f"{comparison.diff:+.4f} [{comparison.low:+.4f}, {comparison.high:+.4f}]"


def format_table(rows: list[dict], chosen: int, evidence: Evidence | None, latency: dict[int, Latency]) -> str:
    """A Table 4a-style Markdown table of sweep rows, the chosen k (and the best, if another) marked.

    Args:
        rows: Sweep rows (``k``, headline metrics, ``fitness``).
        chosen: The k chosen.
        evidence: The bootstrap evidence; ``None`` where the task keeps no per-image statistics (point values only).
        latency: ``{k: Latency}`` of the latency measurement.
    """
    names = metric_names(rows)
    ks = [r["k"] for r in rows]
    best = evidence.best if evidence else chosen
    metric = evidence.metric if evidence else "fitness"
    columns = [*names, *(["fitness"] if metric not in names else [])]
    header = ["k", *columns]
    if evidence:
        header = ["k", *(f"{n} [{CONFIDENCE:.0%} interval]" for n in columns),
                  f"Δ {metric} vs k={ks[0]}", f"Δ {metric} vs best (k={best})"]  # fmt: skip
    header += ["latency ms/img, median (IQR)", f"latency vs k={ks[0]}"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        k = r["k"]
        mark = f"**{k}** (chosen)" if k == chosen else str(k)
        mark += " (best)" if k == best else ""
        if evidence:
            cells = [format_interval(r[n], evidence.intervals[k][n]) for n in columns]
            cells += ["-" if k == ks[0] else format_difference(evidence.vs_cheapest[k]),
                      "-" if k == best else format_difference(evidence.vs_best[k])]  # fmt: skip
        else:
            cells = [f"{r[n]:.4f}" for n in columns]
        vs = "-" if k == ks[0] else format_vs_cheapest(latency[k], ks[0])
        lines.append("| " + " | ".join([mark, *cells, format_ms(latency[k]), vs]) + " |")
    return "\n".join(lines)


def intervals_note(evidence: Evidence) -> str:
    """How the intervals of the table were made, and why a metric's interval need not be centred on it."""
    return (f"Intervals: {CONFIDENCE:.0%} percentile intervals of a paired bootstrap over the {evidence.images} "
            f"validation images ({evidence.resamples} resamples, seed {evidence.seed}). A metric over a resample with "
            "repeated images runs higher than over the set itself (AP is not linear in the images), so its interval "
            "need not be centred on it; the choice uses the paired differences between k.")  # fmt: skip


def plot_sweep(
    rows: list[dict],
    chosen: int,
    evidence: Evidence | None,
    latency: dict[int, Latency],
    path: Path,
    title: str,
    latency_title: str,
) -> Path:
    """Headline metrics with their intervals (top) and latency with its IQR from 0 ms (bottom, titled
    ``latency_title``: size and machine) against k, the chosen k marked; saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, (ax, lat) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, tight_layout=True)
    for name, marker in zip(metric_names(rows), "os"):
        values = [r[name] for r in rows]
        errors = None
        if evidence:
            spans = [evidence.intervals[k][name] for k in ks]
            errors = [[v - lo for v, (lo, _) in zip(values, spans)], [hi - v for v, (_, hi) in zip(values, spans)]]
        ax.errorbar(ks, values, yerr=errors, marker=marker, capsize=3, label=name)
    ax.set_ylabel(f"metric ({CONFIDENCE:.0%} bootstrap interval)" if evidence else "metric (no interval)")
    ax.legend(loc="best", fontsize=8)
    medians = [latency[k].median for k in ks]
    spread = [[m - latency[k].low for m, k in zip(medians, ks)], [latency[k].high - m for m, k in zip(medians, ks)]]
    lat.errorbar(ks, medians, yerr=spread, fmt="k--^", capsize=3, label="median (IQR over rounds)")
    lat.set_ylim(bottom=0)
    lat.set_title(latency_title, fontsize=7)
    lat.set_ylabel("latency (ms/img)")
    lat.set_xlabel("top-k (0 = coarse attention only)")
    lat.set_xticks(ks)
    lat.legend(loc="lower right", fontsize=8)
    for axis in ax, lat:
        axis.axvline(chosen, color="grey", lw=0.8, ls=":")
    ax.set_title(f"{title}\nchosen k={chosen}", fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
