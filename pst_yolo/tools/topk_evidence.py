"""The evidence behind ``pst-yolo topk``'s choice: per-image validation statistics, a paired bootstrap over the
validation images, and the rule that keeps the cheapest k unless a larger one is ahead beyond the noise.

Every k is validated on the same images in the same order, so a resample of image indices applies to all k at once
(paired): the differences between k then carry only the noise of which images were drawn, not of which k saw which.
Each resample is scored by the task's own Ultralytics metrics class (``DetMetrics.process``,
``ClassifyMetrics.process``, ``SemanticMetrics.process``, ...), so the metric is exactly the validator's fitness.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

DETECTION_METRIC = "metrics/mAP50-95("  # results_dict keys of detection-family metrics: box (B), mask (M), pose (P)
CONFIDENCE = 0.95
Z_95 = 1.96  # two-sided normal quantile of CONFIDENCE, for the images-needed estimate
DECISION_METRIC = {"detect": "mAP50-95", "obb": "mAP50-95", "semantic": "mIoU", "depth": "delta1"}  # fitness is it
# Metrics classes whose statistics are sums over images, and the attributes that hold the sums: semantic segmentation
# (confusion matrix, images per class) and depth (sums of each image's delta1 ... silog, images counted).
ADDITIVE_STATE = {"SemanticMetrics": ("matrix", "nt_per_image"), "DepthMetrics": ("_totals", "_count")}
VERDICTS = ("behind beyond noise", "within noise", "ahead beyond noise")


def headline_metrics(metrics) -> dict[str, float]:
    """The task's two headline numbers from an Ultralytics metrics object, plus its fitness.

    Detection-family tasks give ``mAP50`` and ``mAP50-95`` of their last metric group (box for detect/OBB, mask for
    segment, pose keypoints for pose); other tasks give their first two ``results_dict`` values (classification:
    ``accuracy_top1``, ``accuracy_top5``).
    """
    results = metrics.results_dict
    groups = [key[len(DETECTION_METRIC) : -1] for key in results if key.startswith(DETECTION_METRIC)]
    if groups:
        g = groups[-1]
        return {
            "mAP50": float(results[f"metrics/mAP50({g})"]),
            "mAP50-95": float(results[f"metrics/mAP50-95({g})"]),
            "fitness": float(results["fitness"]),
        }
    names = [key for key in results if key != "fitness"][:2]
    return {
        **{name.removeprefix("metrics/"): float(results[name]) for name in names},
        "fitness": float(metrics.fitness),
    }


def metric_label(task: str) -> str:
    """How the decision metric (Ultralytics' fitness) is named in the text: ``mAP50-95`` where fitness is that."""
    return DECISION_METRIC.get(task, "fitness")


class Scorer(Protocol):
    """Anything that scores a subset of validation images: :class:`PerImageStats`, or a stand-in in tests."""

    def __len__(self) -> int: ...

    def score(self, images: Sequence[int]) -> dict[str, float]: ...


@dataclass
class PerImageStats:
    """One validation run's statistics, one entry per image, and the Ultralytics metrics class that scores them.

    Attributes:
        new_metrics: Builds an empty metrics object of the validator's class (``DetMetrics``, ``SegmentMetrics``,
            ``PoseMetrics``, ``OBBMetrics`` with the model's names, or ``ClassifyMetrics``).
        columns: Detection family: the validator's ``metrics.stats`` keys (``tp`` (n_pred, 10) bool, ``conf``,
            ``pred_cls`` (n_pred,), ``target_cls`` (n_target,), ``target_img``, plus ``tp_m`` for segment and
            ``tp_p`` for pose), each a list with one numpy array per image. Classification: ``pred`` (one (1, 5) int
            tensor of top-5 class indices per image) and ``targets`` (one (1,) int tensor per image).
    """

    new_metrics: Callable[[], Any]
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def score(self, images: Sequence[int]) -> dict[str, float]:
        """Headline metrics and fitness of the images ``images`` (indices, repeats allowed), as the validator
        would report them for that set."""
        from ultralytics.utils.metrics import ClassifyMetrics

        picked = {name: [column[i] for i in images] for name, column in self.columns.items()}
        metrics = self.new_metrics()
        if isinstance(metrics, ClassifyMetrics):
            metrics.process(picked["targets"], picked["pred"])
        else:
            metrics.stats = picked
            metrics.process(plot=False)
        return headline_metrics(metrics)


def state_value(value: Any) -> Any:
    """A copy of one summed statistic (``None``, nothing summed yet: 0), in the metrics class's own dtype."""
    if value is None:
        return 0.0
    if hasattr(value, "detach"):
        return value.detach().clone()
    return copy.copy(value)


@dataclass
class PerImageSums:
    """One validation run of a metrics class whose statistics are sums over images (:data:`ADDITIVE_STATE`).

    Attributes:
        empty: The validator's metrics object before its first image (its class and settings: names, depth range).
        shares: One dict per image: what that image added to each summed attribute (tensor, array or float).
    """

    empty: Any = None
    shares: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shares)

    def score(self, images: Sequence[int]) -> dict[str, float]:
        """Headline metrics and fitness of the images ``images`` (indices, repeats allowed): the metrics class
        processes the sums of their shares."""
        metrics = copy.deepcopy(self.empty)
        for name in ADDITIVE_STATE[type(metrics).__name__]:
            setattr(metrics, name, sum((self.shares[i][name] for i in images), start=0.0))
        metrics.process()
        return headline_metrics(metrics)

    def add(self, metrics, update_stats: Callable, predictions, targets) -> None:
        """Feed ``update_stats`` (the bound method of ``metrics``) one image of the batch at a time, keeping each
        image's share of the sums."""
        names = ADDITIVE_STATE[type(metrics).__name__]
        if self.empty is None:
            self.empty = copy.deepcopy(metrics)
        for prediction, target in zip(predictions.split(1), targets.split(1)):
            before = {name: state_value(getattr(metrics, name)) for name in names}
            update_stats(prediction, target)
            self.shares.append({name: state_value(getattr(metrics, name)) - before[name] for name in names})


class PerImageRecorder:
    """Validator callbacks that record each validation run's per-image statistics, in the order of the runs.

    ``on_val_start`` opens a run, ``on_val_batch_end`` copies what the validator's ``update_metrics`` kept for the
    batch: the new entries of ``metrics.stats`` (detection family; they are cleared by ``get_stats`` after the last
    batch) or the batch's ``pred``/``targets`` tensors split into one row per image (classification). Semantic and
    depth validators keep only sums: :meth:`summed_per_image` has them add one image at a time. A validator whose
    metrics are none of these leaves its run as ``None`` and is named in ``unsupported``.
    """

    def __init__(self):
        self.runs: list[PerImageStats | None] = []
        self.unsupported: str | None = None
        self._taken = 0

    def on_val_start(self, validator) -> None:
        from ultralytics.utils.metrics import ClassifyMetrics, DetMetrics

        self._taken = 0
        metrics = validator.metrics
        if isinstance(metrics, DetMetrics):
            new = functools.partial(type(metrics), names=metrics.names)
            self.runs.append(PerImageStats(new, {name: [] for name in metrics.stats}))
        elif isinstance(metrics, ClassifyMetrics):
            self.runs.append(PerImageStats(ClassifyMetrics, {"pred": [], "targets": []}))
        elif type(metrics).__name__ in ADDITIVE_STATE:
            self.runs.append(PerImageSums())
        else:
            self.runs.append(None)
            self.unsupported = f"{type(validator).__name__} ({type(metrics).__name__})"
        if hasattr(validator, "update_metrics"):
            validator.update_metrics = self.summed_per_image(validator, validator.update_metrics)

    def summed_per_image(self, validator, update_metrics: Callable) -> Callable:
        """``update_metrics`` that, where the validator's metrics keep sums (:data:`ADDITIVE_STATE`), has them add one
        image at a time into this run's :class:`PerImageSums`; other metrics pass through.

        The metrics object is looked up at each call: validators build it in ``init_metrics``, after ``on_val_start``
        (Ultralytics' depth validator holds a ``DetMetrics`` until then, so its run is typed again here).
        """

        def update(preds, batch):
            metrics = validator.metrics
            if type(metrics).__name__ not in ADDITIVE_STATE:
                return update_metrics(preds, batch)
            if not isinstance(self.runs[-1], PerImageSums):
                self.runs[-1] = PerImageSums()
            update_stats = metrics.update_stats
            metrics.update_stats = functools.partial(self.runs[-1].add, metrics, update_stats)
            try:
                return update_metrics(preds, batch)
            finally:
                del metrics.update_stats  # the class's own method again

        return update

    def on_val_batch_end(self, validator) -> None:
        run = self.runs[-1] if self.runs else None
        if not isinstance(run, PerImageStats):
            return
        if "targets" in run.columns:  # classification: this batch's (B, 5) top-5 indices and (B,) targets
            run.columns["pred"] += list(validator.pred[-1].split(1))
            run.columns["targets"] += list(validator.targets[-1].split(1))
            return
        stats = validator.metrics.stats
        for name, column in run.columns.items():
            column += stats[name][self._taken :]
        self._taken = len(stats["tp"])

    def attach(self, yolo) -> PerImageRecorder:
        """Add the callbacks to a loaded ``ultralytics.YOLO`` (its validators run them); see :meth:`detach`."""
        yolo.add_callback("on_val_start", self.on_val_start)
        yolo.add_callback("on_val_batch_end", self.on_val_batch_end)
        return self

    def detach(self, yolo) -> None:
        """Remove the callbacks that :meth:`attach` added, leaving every other callback in place."""
        yolo.callbacks["on_val_start"].remove(self.on_val_start)
        yolo.callbacks["on_val_batch_end"].remove(self.on_val_batch_end)


def paired_bootstrap(runs: dict[int, Scorer], resamples: int, seed: int) -> dict[int, dict[str, np.ndarray]]:
    """Score every k on the same ``resamples`` resamples (with replacement) of the validation images.

    Costs ``resamples * len(runs)`` metric evaluations. The image indices come from
    ``numpy.random.default_rng(seed)``: the same statistics and seed give the same answer.

    Args:
        runs: Per-image statistics of each k, all of the same images in the same order.
        resamples: Number of bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        ``{k: {metric name: (resamples,) array}}``, the headline metrics and fitness of each resample.
    """
    sizes = {k: len(run) for k, run in runs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the validation runs saw different numbers of images {sizes}; a paired bootstrap needs the "
                         "same images for every k.")  # fmt: skip
    images = next(iter(sizes.values()))
    draws = np.random.default_rng(seed).integers(0, images, size=(resamples, images))
    samples = {}
    for k, run in runs.items():
        scores = [run.score(draw) for draw in draws]
        samples[k] = {name: np.array([s[name] for s in scores]) for name in scores[0]}
    return samples


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The central :data:`CONFIDENCE` percentile interval of bootstrap samples."""
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Comparison:
    """Fitness of one k minus a reference k: on all images (``diff``) and its bootstrap interval and std."""

    diff: float
    low: float
    high: float
    std: float

    @classmethod
    def of(cls, diff: float, samples: np.ndarray) -> Comparison:
        return cls(diff, *percentile_interval(samples), float(np.std(samples)))

    @property
    def verdict(self) -> str:
        """``ahead beyond noise`` (interval above 0), ``behind beyond noise`` (below 0) or ``within noise``."""
        return VERDICTS[(self.low > 0) - (self.high < 0) + 1]

    def describe(self, metric: str, reference: int) -> str:
        """E.g. ``+0.0004 mAP50-95 over k=0, 95% interval [-0.0060, +0.0070]``."""
        interval = f"{CONFIDENCE:.0%} interval [{self.low:+.4f}, {self.high:+.4f}]"
        return f"{self.diff:+.4f} {metric} over k={reference}, {interval}"

    def to_json(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high, "std": self.std, "verdict": self.verdict}


@dataclass
class Evidence:
    """What the validation says about each k, and the choice it supports.

    Attributes:
        metric: Name of the decision metric (Ultralytics' fitness) in the text, e.g. ``mAP50-95``.
        images: Validation images; resamples, seed: of the bootstrap.
        point: ``{k: headline metrics and fitness}`` on all images.
        intervals: ``{k: {metric name: (low, high)}}``, bootstrap intervals of the headline metrics and fitness.
        vs_cheapest, vs_best: ``{k: Comparison}`` of each k's fitness to the cheapest (smallest) k and to the best.
        best: The k with the highest fitness on all images (ties: the smaller k).
        chosen: The cheapest k whose difference to the best reaches 0 (not behind it beyond the noise).
        images_needed: Where no k is separated from another: about how many images would separate the largest
            observed difference from noise at the observed spread (``None`` otherwise, or when all k score alike).
        text: The decision in words, one sentence per line.
    """

    metric: str
    images: int
    resamples: int
    seed: int
    point: dict[int, dict[str, float]]
    intervals: dict[int, dict[str, tuple[float, float]]]
    vs_cheapest: dict[int, Comparison]
    vs_best: dict[int, Comparison]
    best: int
    chosen: int
    images_needed: int | None
    text: str

    def row_fields(self, k: int) -> dict:
        """This k's numbers for a ``topk.json`` row."""
        return {"intervals": {name: list(span) for name, span in self.intervals[k].items()},
                "vs_cheapest": self.vs_cheapest[k].to_json(), "vs_best": self.vs_best[k].to_json()}  # fmt: skip

    def to_json(self) -> dict:
        return {"metric": self.metric, "best_k": self.best, "chosen_k": self.chosen, "images": self.images,
                "resamples": self.resamples, "seed": self.seed, "confidence": CONFIDENCE,
                "images_needed": self.images_needed, "text": self.text}  # fmt: skip


def weigh(runs: dict[int, Scorer], metric: str, resamples: int = 1000, seed: int = 0) -> Evidence:
    """Bootstrap the per-image statistics of each k (:func:`paired_bootstrap`) and choose k.

    Args:
        runs: ``{k: per-image statistics}`` of the same validation images.
        metric: Name of the fitness in the text (:func:`metric_label`).
        resamples: Bootstrap resamples (costs ``resamples * len(runs)`` metric evaluations).
        seed: Seed of the resampling.
    """
    ks = sorted(runs)
    images = len(runs[ks[0]])
    point = {k: runs[k].score(range(images)) for k in ks}
    samples = paired_bootstrap({k: runs[k] for k in ks}, resamples, seed)
    best = max(ks, key=lambda k: (point[k]["fitness"], -k))

    def compare(k: int, reference: int) -> Comparison:
        diff = point[k]["fitness"] - point[reference]["fitness"]
        return Comparison.of(diff, samples[k]["fitness"] - samples[reference]["fitness"])

    vs_cheapest = {k: compare(k, ks[0]) for k in ks}
    vs_best = {k: compare(k, best) for k in ks}
    chosen = next(k for k in ks if vs_best[k].high >= 0)
    separated = any(c.verdict != "within noise" for c in [*vs_cheapest.values(), *vs_best.values()])
    widest = min(ks, key=lambda k: vs_best[k].diff)  # the largest observed difference: the best vs this k
    needed = None if separated else images_needed(images, vs_best[widest])
    evidence = Evidence(metric, images, resamples, seed, point,
                        {k: {name: percentile_interval(s) for name, s in samples[k].items()} for k in ks},
                        vs_cheapest, vs_best, best, chosen, needed, "")  # fmt: skip
    evidence.text = decision_text(evidence, separated, widest)
    return evidence


def images_needed(images: int, difference: Comparison) -> int | None:
    """About how many images would put ``difference`` outside its 95% interval at the same per-image spread:
    n' = n (1.96 sigma / |d|)^2, as the bootstrap std sigma shrinks like 1/sqrt(n). ``None`` when d = 0."""
    if difference.diff == 0:
        return None
    return math.ceil(images * (Z_95 * difference.std / abs(difference.diff)) ** 2)


def decision_text(evidence: Evidence, separated: bool, widest: int) -> str:
    """The decision in words: each k against the cheapest, then the choice and why, then (if nothing is separated)
    that the validation set is too small and how many images would be needed."""
    ks, metric, best, chosen = sorted(evidence.point), evidence.metric, evidence.best, evidence.chosen
    cheapest = ks[0]
    lines = [f"k={k}: {evidence.vs_cheapest[k].describe(metric, cheapest)}: {evidence.vs_cheapest[k].verdict}"
             for k in ks[1:]]  # fmt: skip
    if chosen == cheapest == best:
        lines.append(f"keeping k={cheapest}: the highest {metric} and the cheapest")
    elif chosen == cheapest:
        lines.append(f"keeping k={cheapest}, the cheapest: the best, k={best}, is within noise of it")
    else:
        lines.append(f"choosing k={chosen}: every cheaper k is behind the best, k={best}, beyond noise"
                     + ("" if chosen == best else f"; k={chosen} is the cheapest within noise of it "
                        f"({evidence.vs_best[chosen].describe(metric, best)})"))  # fmt: skip
    if not separated:
        verdict = f"the {evidence.images} validation images cannot separate any k from another"
        if evidence.images_needed is None:
            lines.append(f"{verdict}: every k scored the same {metric}")
        else:
            gap = evidence.vs_best[widest]
            lines.append(f"{verdict}; the largest difference, k={best} over k={widest} ({-gap.diff:+.4f} {metric}, "
                         f"bootstrap std {gap.std:.4f}), would need about {evidence.images_needed} images at this "
                         "spread")  # fmt: skip
    return "\n".join(lines)


def fallback_text(task: str, validator: str, best: int) -> str:
    """The warning where the task's validator keeps no per-image statistics (no interval can be computed)."""
    return (f"pst-yolo topk: the {task} validator {validator} keeps no per-image statistics, so the ks have no "
            f"intervals; choosing k={best}, the highest fitness, which may be noise")  # fmt: skip
