"""Heatmaps and PSA token selections: selection vs a brute-force eq. 3, box geometry, drawn pixels, the CLI."""

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.utils import ASSETS

import pst_yolo
from pst_yolo.tools.heatmap import HEAD_COLORS, attention_maps, main, render, save_heatmaps

BUS = ASSETS / "bus.jpg"
IMGSZ = 320  # bus.jpg (1080 x 810) -> 320 x 256 input: 8 px of padding left and right, odd-free grids
CLS_YAML = """
nc: 10
scales: {n: [0.50, 0.25, 1024]}
backbone:
  - [-1, 1, Conv, [64, 3, 2]] # 0-P1/2
  - [-1, 1, Conv, [128, 3, 2]] # 1-P2/4
  - [-1, 1, Conv, [256, 3, 2]] # 2-P3/8
  - [-1, 1, Conv, [512, 3, 2]] # 3-P4/16
  - [-1, 1, Conv, [1024, 3, 2]] # 4-P5/32
head:
  - [[3, 4], 1, PST, [512, 2, 0.5, 4]] # 5 fine P4, upper P5
  - [-1, 1, Classify, [nc]]
"""


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return YOLO("yolo11n-pst.yaml").model.eval()


def reference_top_tokens(attn, x, up, k):
    """Brute-force eq. 3: full softmax(q k^T / sqrt(d)) averaged over queries, top-k per head -> (heads, k)."""
    C, nh, d = x.shape[1], attn.num_heads, attn.head_dim
    q = attn.q(x).flatten(2).view(nh, d, -1).transpose(1, 2)  # (nh, N, d)
    key = attn.kv(up)[:, :C].flatten(2).view(nh, d, -1).transpose(1, 2)  # (nh, M, d)
    scores = (q @ key.transpose(1, 2) / d**0.5).softmax(-1).mean(1)  # (nh, M)
    return scores.topk(k, dim=-1).indices.numpy()


def letterbox_geometry(image_hw, input_hw):
    """Gain and (pad_x, pad_y) of a centred letterbox, derived independently of the package."""
    gain = min(input_hw[0] / image_hw[0], input_hw[1] / image_hw[1])
    return gain, ((input_hw[1] - image_hw[1] * gain) / 2, (input_hw[0] - image_hw[0] * gain) / 2)


def test_selection_matches_brute_force_eq3(detector):
    inputs = {}
    attns = {i: m.blocks[0].attn for i, m in enumerate(detector.model) if isinstance(m, pst_yolo.PST)}
    hooks = [a.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args)) for i, a in attns.items()]
    try:
        maps = attention_maps(detector, BUS, topk=5, imgsz=IMGSZ)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(maps["selections"]) == sorted(attns) == [11, 14]
    for i, attn in attns.items():
        (selection,) = maps["selections"][i]
        with torch.no_grad():
            expected = reference_top_tokens(attn, *inputs[i], 5)
        assert selection["topk"] == 5 and selection["coarse_index"].shape == (attn.num_heads, 5)
        np.testing.assert_array_equal(np.sort(selection["coarse_index"]), np.sort(expected))


def test_boxes_match_indices_and_grid(detector):
    maps = attention_maps(detector, BUS, imgsz=IMGSZ)
    image_hw, input_hw = maps["image_shape"], maps["input_shape"]
    assert image_hw == (1080, 810) and input_hw == (320, 256)
    gain, (pad_x, pad_y) = letterbox_geometry(image_hw, input_hw)
    for i, (selection,) in maps["selections"].items():
        heat = maps["heatmaps"][i]
        assert heat.shape == image_hw and heat.min() == 0 and heat.max() == 1
        (H, W), (Hu, Wu) = selection["fine_grid"], selection["coarse_grid"]
        assert (H, W) == maps["features"][i].shape and (Hu, Wu) == ((H + 1) // 2, (W + 1) // 2)
        stride = input_hw[0] / H
        boxes, index = selection["coarse_boxes"], selection["coarse_index"]
        centre_x = ((boxes[..., 0] + boxes[..., 2]) / 2) * gain + pad_x  # input pixels
        centre_y = ((boxes[..., 1] + boxes[..., 3]) / 2) * gain + pad_y
        cells = (centre_y // (2 * stride)) * Wu + centre_x // (2 * stride)
        np.testing.assert_array_equal(cells, index)
        for h in range(index.shape[0]):  # each valid fine box is one of its coarse box's 2x2 children
            fine = selection["fine_boxes"][h].reshape(-1, 4, 4)
            valid = selection["fine_valid"][h].reshape(-1, 4)
            assert valid.any(axis=1).all()
            inside = (fine[..., :2] >= boxes[h][:, None, :2] - 1e-3) & (fine[..., 2:] <= boxes[h][:, None, 2:] + 1e-3)
            assert inside.all(axis=-1)[valid].all()
            width = (fine[..., 2] - fine[..., 0])[valid]
            unclipped = ((fine[..., 0] > 0) & (fine[..., 2] < image_hw[1]))[valid]  # cells cut by the padding shrink
            assert unclipped.any() and (width <= stride / gain + 1e-3).all()
            np.testing.assert_allclose(width[unclipped], stride / gain, rtol=1e-4)


def test_png_shows_heatmap_and_drawn_boxes(detector, tmp_path):
    (path,) = save_heatmaps(detector, BUS, project=tmp_path, per_head=True, imgsz=IMGSZ, panel_height=240)
    png = cv2.imread(str(path))
    maps = attention_maps(detector, BUS, imgsz=IMGSZ)
    canvas, layout = render(cv2.imread(str(BUS)), maps, per_head=True, panel_height=240)
    np.testing.assert_array_equal(png, canvas)
    assert png.shape[0] == 3 * (26 + 240) + 2 * 4 and png.std() > 10
    x, y, scale = layout["layer 14 head 0"]
    heat_panel = png[y : y + 240, x : x + round(810 * scale)]
    assert len(np.unique(heat_panel.reshape(-1, 3), axis=0)) > 1000  # a heatmap, not a flat fill
    for i, (selection,) in maps["selections"].items():
        for h in range(selection["coarse_index"].shape[0]):
            x, y, scale = layout[f"layer {i} head {h}"]
            for x0, y0, x1, y1 in np.round(selection["coarse_boxes"][h] * scale).astype(int):
                for cx, cy in ((x0, y0), (x1 - 1, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)):
                    assert tuple(png[y + cy, x + cx]) == HEAD_COLORS[h]


def test_classification_model(tmp_path):
    cfg = tmp_path / "cls-pst.yaml"
    cfg.write_text(CLS_YAML)
    maps = attention_maps(str(cfg), BUS, imgsz=96)
    (selection,) = maps["selections"][5]
    assert maps["input_shape"] == (96, 96) and selection["fine_grid"] == (6, 6) and selection["coarse_grid"] == (3, 3)
    assert selection["coarse_index"].shape == (2, 4) and len(set(selection["coarse_index"][0])) == 4
    boxes = selection["coarse_boxes"]
    assert (boxes[..., 2] > boxes[..., 0]).all() and boxes.max() <= 1080


def test_cli(tmp_path):
    main(["model=yolo11n-pst.yaml", f"source={ASSETS}", f"project={tmp_path}", "imgsz=160", "layers=14,20", "topk=0"])
    for name in ("bus", "zidane"):
        png = cv2.imread(str(tmp_path / f"{name}.png"))
        assert png is not None and png.shape[0] == 26 + 480 and png.std() > 10
    with pytest.raises(SystemExit, match="bad arguments"):
        main(["model=yolo11n-pst.yaml"])
