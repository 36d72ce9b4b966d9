"""``pst-yolo topk``'s evidence on constructed per-image statistics: the paired bootstrap, the choice of k and its
words, the per-image recorder, the latency spread, and the table and plot that carry them (no model is validated)."""

from __future__ import annotations

import functools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER
from ultralytics.utils.metrics import ClassifyMetrics, DepthMetrics, DetMetrics, SegmentMetrics, SemanticMetrics

from pst_yolo.nn import PSAttn
from pst_yolo.tools import topk
from pst_yolo.tools import topk_evidence as evidence_module
from pst_yolo.tools.bench.timing import round_robin_samples
from pst_yolo.tools.topk_evidence import PerImageRecorder, PerImageStats, paired_bootstrap, weigh
from pst_yolo.tools.topk_latency import Latency, format_vs_cheapest, measure_latency, summarize
from pst_yolo.tools.topk_report import format_table, plot_sweep

IMAGES = 60
BASE_HITS = np.array([4 + i % 5 for i in range(IMAGES)])  # IoU thresholds (of 10) each image's prediction passes


def image_stats(hits: int, image: int) -> dict[str, np.ndarray]:
    """One image as the detection validator keeps it: one target of class image % 2, one prediction of that class
    matched at the first ``hits`` of the 10 IoU thresholds, a confidence that depends on the image only."""
    cls = np.array([image % 2], dtype=float)
    return {"tp": np.arange(10)[None] < hits, "conf": np.array([0.3 + 0.6 * ((image * 37) % IMAGES) / IMAGES]),
            "pred_cls": cls, "target_cls": cls, "target_img": np.unique(cls)}  # fmt: skip


def detection_run(hits: np.ndarray) -> PerImageStats:
    images = [image_stats(int(h), i) for i, h in enumerate(hits)]
    columns = {name: [image[name] for image in images] for name in images[0]}
    return PerImageStats(functools.partial(DetMetrics, names={0: "a", 1: "b"}), columns)


def changed(hits: np.ndarray, better: range | list, worse: range | list = ()) -> np.ndarray:
    """``hits`` passing two more thresholds on the ``better`` images and one fewer on the ``worse`` ones."""
    hits = hits.copy()
    hits[list(better)] = np.minimum(hits[list(better)] + 2, 10)
    hits[list(worse)] -= 1
    return hits


def test_score_is_ultralytics_metric_on_the_chosen_images():
    run = detection_run(BASE_HITS)
    reference = DetMetrics(names={0: "a", 1: "b"})
    reference.stats = {name: list(column) for name, column in run.columns.items()}
    reference.process()
    assert run.score(range(IMAGES)) == topk.headline_metrics(reference)
    assert run.score([0, 0, 1]) != run.score([0, 1, 2])  # repeats count, other images differ


def test_a_larger_k_ahead_beyond_noise_is_chosen():
    """k=8 passes two more IoU thresholds on 48 of 60 images (one fewer on 4): ahead of k=0 beyond the noise. k=16
    differs from k=8 on four images only, so k=8, the cheaper, is kept even if k=16 scores a hair higher."""
    hits8 = changed(BASE_HITS, range(0, 48), range(50, 54))
    hits16 = changed(hits8, [55, 57], [1, 3])
    evidence = weigh({0: detection_run(BASE_HITS), 8: detection_run(hits8), 16: detection_run(hits16)}, "mAP50-95")
    assert evidence.vs_cheapest[8].verdict == "ahead beyond noise" and evidence.vs_cheapest[8].low > 0
    assert evidence.vs_best[0].high < 0 and evidence.vs_best[8].verdict == "within noise"
    assert evidence.chosen == 8 and evidence.images_needed is None
    assert "k=8: +0." in evidence.text and "ahead beyond noise" in evidence.text
    assert "choosing k=8: every cheaper k is behind the best" in evidence.text
    assert "cannot separate" not in evidence.text


def test_a_larger_k_ahead_by_a_hair_keeps_the_cheapest():
    """k=32 is better on two images and worse on one: the highest point mAP, but within noise, so k=0 is kept; the
    60 images cannot separate the two, and the text says how many would at the observed spread."""
    hits32 = changed(BASE_HITS, [2, 33], [14])
    evidence = weigh({0: detection_run(BASE_HITS), 32: detection_run(hits32)}, "mAP50-95")
    gap = evidence.vs_cheapest[32]
    assert evidence.best == 32 and gap.diff > 0 and gap.low < 0 < gap.high
    assert evidence.chosen == 0
    assert f"k=32: {gap.diff:+.4f} mAP50-95 over k=0, 95% interval [{gap.low:+.4f}, {gap.high:+.4f}]: within noise" in (
        evidence.text
    )
    assert "keeping k=0, the cheapest: the best, k=32, is within noise of it" in evidence.text
    needed = math.ceil(IMAGES * (1.96 * evidence.vs_best[0].std / abs(evidence.vs_best[0].diff)) ** 2)
    assert evidence.images_needed == needed > IMAGES
    assert f"the {IMAGES} validation images cannot separate any k from another" in evidence.text
    assert f"would need about {needed} images" in evidence.text


def test_identical_k_say_so():
    evidence = weigh({0: detection_run(BASE_HITS), 4: detection_run(BASE_HITS)}, "mAP50-95", resamples=50)
    assert evidence.chosen == evidence.best == 0 and evidence.images_needed is None
    assert "every k scored the same mAP50-95" in evidence.text


def test_the_seed_fixes_the_answer():
    runs = {0: detection_run(BASE_HITS), 8: detection_run(changed(BASE_HITS, [2, 33], [14]))}
    first, again, other = (weigh(runs, "mAP50-95", resamples=100, seed=s) for s in (0, 0, 1))
    assert first.intervals == again.intervals and first.text == again.text
    assert first.intervals != other.intervals


class RecordingScorer:
    """Records the images it was asked to score."""

    def __init__(self, images: int):
        self.images, self.draws = images, []

    def __len__(self) -> int:
        return self.images

    def score(self, images) -> dict[str, float]:
        self.draws.append(np.array(images))
        return {"fitness": float(np.mean(images))}


def test_bootstrap_is_paired():
    runs = {k: RecordingScorer(IMAGES) for k in (0, 8, 32)}
    samples = paired_bootstrap(runs, resamples=30, seed=0)
    assert all(len(run.draws) == 30 for run in runs.values())
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].draws, runs[32].draws))
    assert not np.array_equal(runs[0].draws[0], runs[0].draws[1])
    assert np.array_equal(samples[0]["fitness"], samples[8]["fitness"])
    with pytest.raises(ValueError, match="different numbers of images"):
        paired_bootstrap({0: RecordingScorer(IMAGES), 8: RecordingScorer(IMAGES - 1)}, resamples=5, seed=0)


def classification_run(correct: np.ndarray) -> PerImageStats:
    """Image i of class i % 5; its top-5 starts with the right class where ``correct``, else with the next one."""
    targets = [torch.tensor([i % 5], dtype=torch.int32) for i in range(len(correct))]
    pred = [torch.tensor([[(i + (0 if ok else 1)) % 5, 9, 8, 7, 6]], dtype=torch.int32) for i, ok in enumerate(correct)]
    return PerImageStats(ClassifyMetrics, {"pred": pred, "targets": targets})


def test_classification_statistics_choose_by_evidence():
    half = np.arange(IMAGES) % 2 == 0
    most = np.arange(IMAGES) % 10 != 0
    run = classification_run(half)
    assert run.score(range(IMAGES)) == {"accuracy_top1": 0.5, "accuracy_top5": 0.5, "fitness": 0.5}
    assert weigh({0: run, 4: classification_run(most)}, "fitness", resamples=100).chosen == 4
    hair = half.copy()
    hair[1] = True  # one more image right
    evidence = weigh({0: run, 4: classification_run(hair)}, "fitness", resamples=100)
    assert evidence.best == 4 and evidence.chosen == 0


def detection_batch(validator, images: range) -> None:
    for i in images:
        validator.metrics.update_stats({**image_stats(int(BASE_HITS[i]), i), "im_name": f"{i}.png"})


def test_recorder_copies_each_batch_of_each_run():
    recorder = PerImageRecorder()
    validator = SimpleNamespace(metrics=SegmentMetrics(names={0: "a", 1: "b"}))
    for _ in range(2):  # two validation runs, as two k of a sweep
        validator.metrics.clear_stats()
        recorder.on_val_start(validator)
        for batch in (range(0, 3), range(3, 5)):
            for i in batch:
                validator.metrics.update_stats({**image_stats(int(BASE_HITS[i]), i), "tp_m": np.zeros((1, 10), bool),
                                                "im_name": f"{i}.png"})  # fmt: skip
            recorder.on_val_batch_end(validator)
    assert len(recorder.runs) == 2 and [len(run) for run in recorder.runs] == [5, 5]
    assert set(recorder.runs[0].columns) == {"tp", "tp_m", "conf", "pred_cls", "target_cls", "target_img"}
    assert isinstance(recorder.runs[0].new_metrics(), SegmentMetrics) and recorder.unsupported is None
    assert recorder.runs[0].score(range(5))["fitness"] == recorder.runs[1].score(range(5))["fitness"] > 0

    classify = SimpleNamespace(metrics=ClassifyMetrics(), pred=[], targets=[])
    recorder.on_val_start(classify)
    for size in (3, 2):
        classify.pred.append(torch.arange(5 * size, dtype=torch.int32).reshape(size, 5) % 5)
        classify.targets.append(torch.zeros(size, dtype=torch.int32))
        recorder.on_val_batch_end(classify)
    assert len(recorder.runs[2]) == 5 and recorder.runs[2].score(range(5))["accuracy_top1"] == 1.0


def test_a_validator_without_per_image_statistics_falls_back_with_a_warning(monkeypatch):
    class TrackMetrics:  # a metrics class the recorder does not know
        pass

    warnings = []
    monkeypatch.setattr(LOGGER, "warning", warnings.append)
    recorder = PerImageRecorder()
    validator = SimpleNamespace(metrics=TrackMetrics())
    for _ in range(2):
        recorder.on_val_start(validator)
        recorder.on_val_batch_end(validator)
    assert recorder.runs == [None, None] and "TrackMetrics" in recorder.unsupported
    rows = [{"k": 0, "fitness": 0.3}, {"k": 8, "fitness": 0.31}]
    chosen, evidence, text = topk.choose(rows, recorder, "track")
    assert (chosen, evidence) == (8, None)
    assert warnings == [text] and "track validator" in text and "keeps no per-image statistics" in text


class SumsValidator:
    """The part of Ultralytics' semantic/depth validators the recorder touches: ``init_metrics`` builds the metrics
    object after ``on_val_start`` (the depth validator holds a ``DetMetrics`` until then), and ``update_metrics``
    passes each batch to its ``update_stats``."""

    def __init__(self, new_metrics, first=None):
        self.new_metrics, self.metrics = new_metrics, first or new_metrics()

    def init_metrics(self):
        self.metrics = self.new_metrics()

    def update_metrics(self, preds, batch):
        self.metrics.update_stats(preds, batch)


SUMS_CASES = {  # metrics class, (B, ...) predictions and targets of 6 images
    "semantic": (
        functools.partial(SemanticMetrics, names={0: "a", 1: "b", 2: "c"}),
        lambda g: (torch.randint(0, 3, (6, 8, 8), generator=g), torch.randint(0, 3, (6, 8, 8), generator=g)),
    ),
    "depth": (
        DepthMetrics,
        lambda g: (torch.rand((6, 1, 8, 8), generator=g) + 1, torch.rand((6, 1, 8, 8), generator=g) + 1),
    ),
}


@pytest.mark.parametrize("task", SUMS_CASES)
def test_summed_metrics_are_recorded_per_image(task):
    """Semantic and depth metrics keep sums: the recorder has them add one image at a time, and any set of images
    scores as Ultralytics' metrics class does when fed those images."""
    new_metrics, make = SUMS_CASES[task]
    preds, targets = make(torch.Generator().manual_seed(0))
    if task == "semantic":
        targets[0, :2] = 255  # ignored pixels
    recorder = PerImageRecorder()
    validator = SumsValidator(new_metrics, DetMetrics(names={0: "depth"}) if task == "depth" else None)
    recorder.on_val_start(validator)
    validator.init_metrics()
    for batch in (slice(0, 4), slice(4, 6)):
        validator.update_metrics(preds[batch], targets[batch])
        recorder.on_val_batch_end(validator)
    run = recorder.runs[0]
    assert len(run) == 6 and recorder.unsupported is None
    assert "update_stats" not in vars(validator.metrics)  # the class's own method again
    validator.metrics.process()
    assert run.score(range(6)) == pytest.approx(evidence_module.headline_metrics(validator.metrics), abs=1e-12)

    picked = [5, 0, 0, 3]  # a resample: repeats allowed
    reference = new_metrics()
    for i in picked:
        reference.update_stats(preds[i : i + 1], targets[i : i + 1])
    reference.process()
    assert run.score(picked) == pytest.approx(evidence_module.headline_metrics(reference), abs=1e-12)
    assert run.score(picked) != run.score(range(6))


def test_choose_adds_intervals_and_checks_the_validator_fitness():
    recorder = PerImageRecorder()
    recorder.runs = [detection_run(BASE_HITS), detection_run(changed(BASE_HITS, range(48), range(50, 54)))]
    rows = [{"k": k, **run.score(range(IMAGES))} for k, run in zip((0, 8), recorder.runs)]
    chosen, evidence, _ = topk.choose(rows, recorder, "detect", resamples=50)
    assert chosen == 8 and evidence.metric == "mAP50-95"
    assert rows[1]["vs_cheapest"]["verdict"] == "ahead beyond noise" and len(rows[1]["intervals"]["mAP50"]) == 2
    assert json.loads(json.dumps([rows, evidence.to_json()]))[1]["chosen_k"] == 8
    rows[0]["fitness"] += 0.01
    with pytest.raises(RuntimeError, match="per-image statistics score fitness"):
        topk.choose(rows, recorder, "detect", resamples=50)


def test_round_robin_samples_keep_each_round():
    calls = []
    samples = round_robin_samples({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1,
                                  torch.device("cpu"))  # fmt: skip
    assert calls == ["a", "b"] * 4 and [len(t) for t in samples.values()] == [3, 3]


def test_latency_differences_inside_the_spread_are_not_ranked():
    rounds = [10.0, 12.0, 11.0, 10.5, 11.5, 10.2]
    latency = summarize({0: rounds, 8: [t + 0.5 for t in rounds], 32: [t + 2 for t in rounds]})
    assert (latency[0].median, latency[0].low, latency[0].high) == pytest.approx((10.75, 10.275, 11.375))
    assert latency[8].diff == pytest.approx(0.5)  # in every round, but inside the spread:
    assert format_vs_cheapest(latency[8], 0) == "≈ k=0"
    assert format_vs_cheapest(latency[32], 0) == "+2.00 ms"
    assert json.loads(json.dumps([lat.to_json() for lat in latency.values()]))[2]["like_cheapest"] is False


def test_measure_latency_times_copies_at_each_k():
    model = DetectionModel("yolo11n-pst.yaml", verbose=False)
    latency = measure_latency(model, [0, 8], 32, torch.device("cpu"), rounds=3, calls=1, warmup=1)
    assert set(latency) == {0, 8} and all(0 < lat.low <= lat.median <= lat.high for lat in latency.values())
    assert {m.topk for m in model.modules() if isinstance(m, PSAttn)} == {8} and not model.is_fused()


def test_table_and_plot_carry_the_intervals(tmp_path):
    runs = {0: detection_run(BASE_HITS), 32: detection_run(changed(BASE_HITS, [2, 33], [14]))}
    evidence = weigh(runs, "mAP50-95", resamples=100)
    rows = [{"k": k, **evidence.point[k]} for k in (0, 32)]
    latency = {0: Latency(6.6, 6.5, 6.8, 0, True), 32: Latency(6.5, 6.4, 6.9, -0.1, True)}
    lines = format_table(rows, evidence.chosen, evidence, latency).splitlines()
    assert lines[0] == ("| k | mAP50 [95% interval] | mAP50-95 [95% interval] | Δ mAP50-95 vs k=0 | "
                        "Δ mAP50-95 vs best (k=32) | latency ms/img, median (IQR) | latency vs k=0 |")  # fmt: skip
    low, high = evidence.intervals[0]["mAP50-95"]
    assert lines[2].startswith(f"| **0** (chosen) | {rows[0]['mAP50']:.4f} [")
    assert f"{rows[0]['mAP50-95']:.4f} [{low:.4f}, {high:.4f}] | - |" in lines[2]
    assert lines[3].startswith("| 32 (best) |") and lines[3].endswith("| 6.50 (6.40-6.90) | ≈ k=0 |")
    path = plot_sweep(rows, evidence.chosen, evidence, latency, tmp_path / "topk.png", "title", "latency title")
    assert path.stat().st_size > 10_000
