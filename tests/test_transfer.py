"""Head start from stock weights: ``YOLO(pst_yaml).load(stock.pt)`` takes over every tensor outside the PST rows.

For every config family that extends a stock model (``pst_yolo.configs.STOCK_COUNTERPARTS``), at scale n: the stock
model is built from its stock YAML (no download), its weights are moved off their initial values, it is saved as an
Ultralytics checkpoint, and loaded into the PST config the way users do. Every floating-point tensor outside the PST
rows must then hold the stock value (so it was transferred, not freshly initialised). YOLOv12-PST widens the PST
outputs (``PSTFixedWidth``, the paper's N size): there the layers reading them (15, 17 and the head) cannot take the
stock shapes, and exactly those are allowed to start fresh. Also: configs needing Ultralytics 8.4 say so on older
versions.
"""

from __future__ import annotations

import pytest
import torch
import ultralytics
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

from pst_yolo.configs import STOCK_COUNTERPARTS, find_model_config, stock_counterpart
from pst_yolo.integration import PluginBuildError
from pst_yolo.tools.transfer import layer_index, transfer_report

FAMILIES = sorted(STOCK_COUNTERPARTS)
# Layers whose input width PSTFixedWidth changes: the bottom-up conv and block after P3, and the head (index 21).
FIXED_WIDTH_CONSUMERS = {15, 17, 21}


def scale_n(family: str) -> str:
    """``yolo11-seg-pst`` -> ``yolo11n-seg-pst.yaml``."""
    version, rest = family.split("-", 1)
    return f"{version}n-{rest}.yaml"


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_checkpoint_transfers_every_tensor_outside_pst_rows(family, tmp_path):
    stock = YOLO(stock_counterpart(scale_n(family)))  # the stock YAML: nothing downloaded
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in stock.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) + 0.5)  # no longer equal to any initial value
    checkpoint = tmp_path / "stock.pt"
    stock.save(str(checkpoint))  # fp16 weights, as Ultralytics' checkpoints hold
    stock_weights = {k: v.half().float() for k, v in stock.model.state_dict().items()}

    pst = YOLO(scale_n(family))
    report = transfer_report(pst.model, stock.model)
    pst.load(str(checkpoint))
    weights = pst.model.state_dict()
    outside = [k for k in weights if layer_index(k) not in report.pst_rows]
    transferred = [k for k in outside if k in stock_weights and torch.equal(weights[k], stock_weights[k])]
    floats = [k for k in outside if weights[k].is_floating_point()]
    fresh = sorted({layer_index(k) for k in floats if k not in transferred})
    print(f"\n[transfer] {family} <- {stock_counterpart(scale_n(family))}: {report.summary()}")

    assert len(report.pst_rows) == 2
    if "PSTFixedWidth" in find_model_config(scale_n(family)).read_text():
        assert set(fresh) == FIXED_WIDTH_CONSUMERS
        assert {layer_index(k) for k in report.outside_pst_missing} == FIXED_WIDTH_CONSUMERS
    else:
        assert fresh == [], f"non-PST layers {fresh} did not take the stock weights"
        assert report.outside_pst_missing == []
        assert report.outside_pst == len(outside)


def test_yolo26_configs_name_the_ultralytics_version_they_need(monkeypatch):
    monkeypatch.setattr(ultralytics, "__version__", "8.3.105")
    with pytest.raises(PluginBuildError, match=r"yolo26n-seg-pst\.yaml needs Ultralytics >= 8\.4\.0, but 8\.3\.105"):
        DetectionModel("yolo26n-seg-pst.yaml", verbose=False)
    DetectionModel("yolo11n-pst.yaml", verbose=False)  # configs without the requirement still build there
