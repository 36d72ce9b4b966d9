"""Every shipped config builds at every scale it defines, by the short name users pass, with the documented size.

Sizes are those of ``pst_yolo.tools.model_sizes`` (fused, eval, k=0; GFLOPs in the paper's convention at 640).
"""

from __future__ import annotations

import json
import re

import pytest
from ultralytics import YOLO

from pst_yolo import PST
from pst_yolo.configs import model_configs
from pst_yolo.tools.model_sizes import (
    EXTENSION_CONFIGS,
    PAPER_ROWS,
    ModelSize,
    StockComparison,
    all_flops,
    config_scales,
    count_params,
    flops_per_op,
    main,
    markdown_table,
    model_name,
    paper_flops,
    prepare_for_measuring,
    stock_comparison_table,
    within_paper_precision,
)

# model name: (params M, paper-convention GFLOPs). A string is the paper's printed value (Tables 1-3), for the rows
# a public layout reproduces: ours must be within 2% of it or round to it. A float is our measured value, for rows
# the paper lacks or that no public layout reproduces (paper value in the comment): ours must be within 0.5% of it.
EXPECTED = {
    "yolo11n-pst": (2.60, 6.40),  # paper YOLOv11-PST-N 2.8 / 10.1: no public layout gives it
    "yolo11s-pst": ("9.3", "21.0"),
    "yolo11m-pst": (20.14, "65.9"),  # paper params 19.5
    "yolo11l-pst": (26.15, 85.48),
    "yolo11x-pst": (58.53, 191.32),
    "yolo12n-pst": ("4.3", "15.8"),
    "yolo12s-pst": (10.87, 28.94),
    "yolo12m-pst": (20.14, 65.90),
    "yolo12l-pst": (26.15, 85.48),
    "yolo12x-pst": (53.91, 169.98),
    "yolo11n-c2psa-pst": (2.59, 6.21),
    "yolo11s-c2psa-pst": (9.34, 20.38),
    "yolo11m-c2psa-pst": ("19.5", 63.08),  # paper GFLOPs 65.9
    "yolo11l-c2psa-pst": (24.53, 80.16),
    "yolo11x-c2psa-pst": (55.06, 179.66),
    "yolo11n-cls-pst": (4.01, 5.59),  # paper YOLOv11-cls-PST-N 3.5 / 4.9: no public layout gives it
    "yolo11s-cls-pst": ("11.5", "19"),
    "yolo11m-cls-pst": (17.67, 47.00),
    "yolo11l-cls-pst": (20.82, 58.86),
    "yolo11x-cls-pst": (44.70, 130.49),
    "r18-pst": ("16.4", "42.5"),
    "r50-pst": ("26.0", "71.9"),
    "r101-pst": ("49.9", "138.5"),
    "r18-cls-pst": ("19.6", "43"),
    "r50-cls-pst": ("29.2", "72"),
    "r101-cls-pst": ("54.4", "140"),
}


def assert_size(measured: float, expected: float | str, what: str) -> None:
    if isinstance(expected, str):
        assert within_paper_precision(measured, expected), f"{what} {measured:.2f}, paper {expected}"
    else:
        assert measured == pytest.approx(expected, rel=0.005), f"{what} {measured:.2f}, documented {expected}"


def test_expected_table_covers_every_shipped_config_and_scale():
    shipped = {
        model_name(c.stem, config_scales(c), s)
        for c in model_configs()
        if c.stem not in EXTENSION_CONFIGS  # other tasks and YOLO26: sizes in docs/MODEL_ZOO_TASKS.md
        for s in config_scales(c)
    }
    assert shipped == set(EXPECTED)


# Task and YOLO26 configs beyond the paper, at s/m/l/x (scale n of each is built in tests/test_transfer.py).
EXTENSION_MODELS = [
    model_name(c.stem, config_scales(c), s)
    for c in model_configs()
    if c.stem in EXTENSION_CONFIGS
    for s in config_scales(c)
    if s != "n"
]


def test_task_and_yolo26_configs_define_every_scale():
    assert len(EXTENSION_MODELS) == 4 * len(EXTENSION_CONFIGS) == 52


def fast_tier_first(names) -> list:
    """The n scale (and ResNet-18) of each config in the fast tier, every other scale in the full suite only."""
    fast = re.compile(r"^(yolo\d+n-|r18-)")
    return [name if fast.match(name) else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.mark.parametrize("name", fast_tier_first(EXTENSION_MODELS))
def test_task_and_yolo26_configs_build_at_every_scale(name):
    model = YOLO(f"{name}.yaml")
    suffixes = (("segment", "-seg"), ("pose", "-pose"), ("obb", "-obb"), ("semantic", "-sem"), ("depth", "-depth"))
    task = next((t for t, key in suffixes if key in name), "detect")
    assert model.task == task
    assert sum(isinstance(m, PST) for m in model.model.modules()) == 2


@pytest.mark.parametrize("name", fast_tier_first(EXPECTED))
def test_builds_by_short_name_with_documented_size(name):
    model = prepare_for_measuring(YOLO(f"{name}.yaml").model)  # the paper's scale when the config defines one
    params, gflops = EXPECTED[name]
    assert_size(count_params(model) / 1e6, params, f"{name} params M")
    assert_size(paper_flops(model) / 1e9, gflops, f"{name} GFLOPs")  # a 32x32 forward


def test_paper_convention_is_the_direct_count_of_convolutions():
    model = prepare_for_measuring(YOLO("yolo11n.yaml").model)
    direct = flops_per_op(model, 640)  # YOLO11n: convolutions and the C2PSA attention (bmm); no linear layer
    assert paper_flops(model) == direct["convolution"]
    assert paper_flops(model) / 1e9 == pytest.approx(6.48, abs=0.005)  # what Ultralytics prints for YOLO11n


def test_paper_convention_counts_the_classifier_linear_per_32px_tile():
    model = prepare_for_measuring(YOLO("yolo11n-cls-pst.yaml").model)
    direct = flops_per_op(model, 640)
    linear = 2 * 1280 * 1000  # Classify: Linear(1280, 1000), once per image
    assert paper_flops(model) == direct["convolution"] + 400 * linear


def test_all_flops_include_attention_matmuls():
    model = prepare_for_measuring(YOLO("yolo11n-pst.yaml").model)
    per_op = flops_per_op(model, 640)
    assert per_op["bmm"] > 0.1 * per_op["convolution"]  # A2C2f and PST coarse attention at P3/P4
    assert all_flops(model, 640) == sum(per_op.values())


def test_paper_precision_rule():
    assert within_paper_precision(18.57, "19")  # rounds to the printed value
    assert within_paper_precision(16.46, "16.4")  # within 2%
    assert not within_paper_precision(2.60, "2.8")
    assert not within_paper_precision(6.40, "10.1")


def test_markdown_table_puts_the_paper_beside_ours():
    sizes = [
        ModelSize("r18-pst", "r18-pst.yaml", "n", "detect", 16.46, 42.74, 44.54),
        ModelSize("yolo11n-pst", "yolo11-pst.yaml", "n", "detect", 2.60, 6.40, 7.40),
        ModelSize("yolo11l-pst", "yolo11-pst.yaml", "l", "detect", 26.15, 85.48, 90.0),
    ]
    rows = markdown_table(sizes).splitlines()[2:]
    assert "16.46 (16.4)" in rows[0] and "reproduces R-18-PST-N (det)" in rows[0]
    assert "2.60 (2.8)" in rows[1] and "does not reproduce YOLOv11-PST-N" in rows[1]
    assert "not in the paper" in rows[2]
    assert PAPER_ROWS["r18-pst"].name == "R-18-PST-N (det)"


def test_stock_comparison_table_puts_the_stock_model_beside_ours():
    pst = ModelSize("yolo26n-pst", "yolo26-pst.yaml", "n", "detect", 2.38, 5.04, 6.63)
    stock = ModelSize("yolo26n", "yolo26n.yaml", "n", "detect", 2.41, 5.36, 5.48)
    (row,) = stock_comparison_table(
        [StockComparison(pst, stock, "612/716 (600/600 non-PST + 12 in PST rows)", 0)]
    ).split("\n")[2:3]
    assert "2.38 (2.41)" in row and "5.04 (5.36)" in row and "6.63 (5.48)" in row and "`yolo26n`" in row
    assert "612/716 (600/600 non-PST" in row


def test_sizes_tool_writes_markdown_and_json(tmp_path):
    md, js = tmp_path / "zoo.md", tmp_path / "sizes.json"
    main(["--configs", "r18-pst", "--markdown-out", str(md), "--json-out", str(js)])
    (entry,) = json.loads(js.read_text())
    assert entry["model"] == "r18-pst" and entry["scale"] == "n" and entry["params_m"] == pytest.approx(16.46, abs=0.01)
    assert entry["gflops_all"] > entry["gflops"]  # attention matmuls on top of convolutions
    assert "pst-yolo sizes --configs r18-pst" in md.read_text()
    assert "| `r18-pst` |" in md.read_text()
