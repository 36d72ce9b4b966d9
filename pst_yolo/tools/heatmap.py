"""Feature heatmaps (paper Section 4.2, Fig. 4) and the upper tokens each PSA head refines.

    pst-yolo heatmap model=best.pt source=IMG_OR_DIR [layers=11,14] [topk=8] [per_head=True] [imgsz=640]
                     [panel_height=480] [project=runs/pst_heatmap]

Per image one PNG: the input, then for each chosen layer (default: every PST layer) the mean absolute activation over
channels, upsampled to the image and coloured blue -> yellow (viridis, as in the paper's Fig. 4); on PST layers the
top-k upper (coarse) tokens selected by each head are drawn as thick rectangles and their 2x2 fine children as thin
ones (one colour per head; ``per_head=True`` adds one panel per head). Works for detection and classification models,
from a checkpoint or a YAML (random weights). Images are letterboxed like ``yolo predict`` (classification images too,
so the whole image is seen), and every box is mapped back to the original image's pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn

from ..nn import PST, PSAttn
from ..ops import coarse_key_scores, select_fine_tokens
from ..validation import check_bool, check_int, check_type

USAGE = __doc__.split("\n\n")[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
HEAD_COLORS = ((0, 0, 255), (255, 0, 255), (255, 255, 255), (0, 128, 255), (0, 0, 0), (203, 192, 255))  # BGR, per head
PAD_VALUE = 114  # LetterBox's padding grey
STRIDE = 32  # input sides are multiples of the P5 stride, as in `yolo predict`
HEAT_ALPHA = 0.7
TITLE_HEIGHT, GAP = 26, 4
COARSE_LINE, FINE_LINE = 2, 1


def load_model(model: str | Path | nn.Module) -> nn.Module:
    """An Ultralytics model module from a checkpoint/YAML path, a ``YOLO`` object or the module itself."""
    from ultralytics import YOLO
    from ultralytics.engine.model import Model

    if isinstance(model, (str, Path)):
        model = YOLO(str(model))
    model = model.model if isinstance(model, Model) else model
    return check_type(
        model, "model", nn.Module, "a checkpoint/YAML path, a YOLO object or a torch.nn.Module", "heatmap"
    )


def default_imgsz(model: nn.Module) -> int | list[int]:
    """The model's training image size (from its ``args``: a dict or a namespace), else 640."""
    return dict(getattr(model, "args", None) or {}).get("imgsz", 640)


def letterbox(image: np.ndarray, imgsz: int | list[int]) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """BGR image (h0, w0, 3) -> input (1, 3, Hi, Wi) in [0, 1] as ``yolo predict`` makes it, and where the image lies.

    Returns:
        The input tensor and the (rows, cols) slices of the input that hold the (resized) image, found by letterboxing
        a white image the same way.
    """
    from ultralytics.data.augment import LetterBox

    transform = LetterBox(imgsz, auto=True, stride=STRIDE)
    boxed = transform(image=image)
    white = transform(image=np.full_like(image, 255))[..., 0] == 255
    rows, cols = np.flatnonzero(white.any(1)), np.flatnonzero(white.any(0))
    x = torch.from_numpy(np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1))).float().div(255).unsqueeze(0)
    return x, (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))


def activation_map(feature: torch.Tensor) -> np.ndarray:
    """Mean absolute activation over channels: feature (1, C, h, w) -> (h, w) float32."""
    return feature[0].abs().float().mean(0).cpu().numpy()


def to_image(heat: np.ndarray, input_hw: tuple[int, int], content: tuple[slice, slice], image_hw: tuple[int, int]):
    """A feature-resolution map (h, w) -> (h0, w0) on the original image, min-max normalised to [0, 1]."""
    full = cv2.resize(heat, (input_hw[1], input_hw[0]), interpolation=cv2.INTER_LINEAR)[content]
    full = cv2.resize(full, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_LINEAR)
    low, high = float(full.min()), float(full.max())
    return ((full - low) / (high - low) if high > low else np.zeros_like(full)).astype(np.float32)


def token_selection(attn: PSAttn, x: torch.Tensor, up: torch.Tensor, topk: int) -> dict:
    """Recompute the selection a PSA module made: eq. 3 scores, top-k upper tokens, their 2x2 fine children.

    Args:
        attn: The module; x (1, C, H, W) and up (1, C, Hu, Wu) its inputs; topk: the k its forward used.

    Returns:
        ``coarse_index``/``coarse_valid`` (heads, k) into the Hu*Wu upper tokens, ``fine_index``/``fine_valid``
        (heads, 4k) into the H*W fine tokens (children (2r+a, 2c+b) in order (a, b) = 00, 01, 10, 11), the grids.
    """
    B, C, H, W = x.shape
    Hu, Wu = up.shape[2:]
    nh, d = attn.num_heads, attn.head_dim
    q = attn.q(x).view(B, nh, d, H * W).transpose(-1, -2)  # (B, nh, N, d)
    k = attn.kv(up)[:, :C].reshape(B, nh, d, Hu * Wu).transpose(-1, -2)  # (B, nh, M, d): K comes first in kv
    index, valid = select_fine_tokens(coarse_key_scores(q, k), (H, W), (Hu, Wu), topk, attn.threshold)  # (B, nh, 4k)
    first_child = index[..., 0::4]  # (B, nh, k): child (2r, 2c), always inside the fine map
    coarse = (first_child // W // 2) * Wu + (first_child % W) // 2
    return {
        "topk": topk,
        "fine_grid": (H, W),
        "coarse_grid": (Hu, Wu),
        "coarse_index": coarse[0].cpu().numpy(),
        "coarse_valid": valid[0, :, 0::4].cpu().numpy(),
        "fine_index": index[0].cpu().numpy(),
        "fine_valid": valid[0].cpu().numpy(),
    }


def selection_boxes(selection: dict, input_hw: tuple[int, int], image_hw: tuple[int, int]) -> dict:
    """Boxes (xyxy, original image pixels) of the selected coarse (heads, k, 4) and fine (heads, 4k, 4) tokens."""
    from ultralytics.utils.ops import scale_boxes

    H, W = selection["fine_grid"]
    sy, sx = input_hw[0] / H, input_hw[1] / W  # fine-token size in input pixels
    fr, fc = np.divmod(selection["fine_index"], W)
    fine = np.stack((fc * sx, fr * sy, (fc + 1) * sx, (fr + 1) * sy), -1)
    cr, cc = np.divmod(selection["coarse_index"], selection["coarse_grid"][1])
    coarse = np.stack((2 * cc * sx, 2 * cr * sy, np.minimum(2 * cc + 2, W) * sx, np.minimum(2 * cr + 2, H) * sy), -1)

    def in_image(boxes: np.ndarray) -> np.ndarray:
        return scale_boxes(input_hw, boxes.reshape(-1, 4).astype(np.float32), image_hw).reshape(boxes.shape)

    return {"coarse_boxes": in_image(coarse), "fine_boxes": in_image(fine)}


def layer_index(model: nn.Module, layers: list[int] | None) -> dict[int, nn.Module]:
    """Chosen layers of an Ultralytics model by index (default: every PST layer)."""
    sequence = getattr(model, "model", None)
    if not isinstance(sequence, nn.Sequential):
        raise TypeError(
            f"heatmap: model must be an Ultralytics model (layers in model.model), got {type(model).__name__}."
        )
    if layers is None:
        chosen = {i: m for i, m in enumerate(sequence) if isinstance(m, PST)}
        if not chosen:
            raise ValueError("The model has no PST layer; choose layers with layers=i,j.")
        return chosen
    check_type(layers, "layers", (list, tuple), "a list of layer indices", "heatmap")
    layers = [check_int(i, "layers[...]", "heatmap") for i in layers]
    if not layers:
        raise ValueError("heatmap: layers is empty; give layer indices, or None for every PST layer.")
    bad = [i for i in layers if not -len(sequence) <= i < len(sequence)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(sequence)} layers.")
    return {i % len(sequence): sequence[i] for i in layers}


def attention_maps(model, image, topk: int | None = None, layers: list[int] | None = None, imgsz=None) -> dict:
    """Feature heatmaps of chosen layers and the tokens each PSA head of their PST blocks selects, for one image.

    Args:
        model: Checkpoint/YAML path, ``YOLO`` object or Ultralytics model module (put in eval mode).
        image: Image path or BGR array (h0, w0, 3).
        topk: Top-k for this call (default: the model's own, or the process-wide ``PSAttn.override_topk``).
        layers: Model layer indices (default: every PST layer).
        imgsz: Inference size (default: the model's training size, else 640).

    Returns:
        dict with ``image_shape`` (h0, w0), ``input_shape`` (Hi, Wi), ``features`` {layer: (h, w) mean |activation|},
        ``heatmaps`` {layer: (h0, w0) in [0, 1]}, ``selections`` {PST layer: one dict per PSA block, see
        :func:`token_selection`, plus ``coarse_boxes`` (heads, k, 4) and ``fine_boxes`` (heads, 4k, 4) in image pixels}.
    """
    model = load_model(model).eval()
    if isinstance(image, (str, Path)):
        image = read_image(image_files(image)[0])
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        shown = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"heatmap: image must be a path or a BGR uint8 array (h, w, 3), got {shown}.")
    if topk is not None:
        check_int(topk, "topk", "heatmap", minimum=0)
    if imgsz is not None and not isinstance(imgsz, (list, tuple)):
        check_int(imgsz, "imgsz", "heatmap", minimum=STRIDE)
    chosen = layer_index(model, layers)
    x, content = letterbox(image, imgsz or default_imgsz(model))
    param = next(model.parameters())
    features, selections, handles = {}, {i: [] for i, m in chosen.items() if isinstance(m, PST)}, []

    def keep_feature(i):
        return lambda module, args, out: features.__setitem__(i, out)

    def keep_selection(i):
        return lambda attn, args, out: selections[i].append((attn, args, attn.active_topk()))

    for i, m in chosen.items():
        handles.append(m.register_forward_hook(keep_feature(i)))
        if isinstance(m, PST):
            handles += [block.attn.register_forward_hook(keep_selection(i)) for block in m.blocks]
    previous = PSAttn.topk_override
    try:
        if topk is not None:
            PSAttn.override_topk(topk)
        with torch.inference_mode():
            model(x.to(param.device, param.dtype))
            picks = {i: [token_selection(a, *args, k) for a, args, k in calls] for i, calls in selections.items()}
    finally:
        PSAttn.override_topk(previous)
        for h in handles:
            h.remove()
    input_hw, image_hw = tuple(x.shape[2:]), image.shape[:2]
    for i, out in features.items():
        if not (isinstance(out, torch.Tensor) and out.dim() == 4):
            raise ValueError(f"Layer {i} ({type(chosen[i]).__name__}) does not output a feature map.")
    maps = {i: activation_map(out) for i, out in features.items()}
    return {
        "image_shape": image_hw,
        "input_shape": input_hw,
        "features": maps,
        "heatmaps": {i: to_image(m, input_hw, content, image_hw) for i, m in maps.items()},
        "selections": {i: [{**s, **selection_boxes(s, input_hw, image_hw)} for s in p] for i, p in picks.items()},
    }


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] -> BGR uint8 (h, w, 3) with matplotlib's viridis (blue -> yellow)."""
    from matplotlib import colormaps

    rgb = colormaps["viridis"](heat)[..., :3]
    return (rgb[..., ::-1] * 255).round().astype(np.uint8)


def draw_selection(panel: np.ndarray, selection: dict, scale: float, heads: list[int]) -> None:
    """Draw, in place, the selected fine (thin) and coarse (thick) token boxes of ``heads``, one colour per head."""
    for h in heads:
        color = HEAD_COLORS[h % len(HEAD_COLORS)]
        drawn = (
            (selection["fine_boxes"][h], selection["fine_valid"][h], FINE_LINE),
            (selection["coarse_boxes"][h], selection["coarse_valid"][h], COARSE_LINE),
        )
        for boxes, valid, width in drawn:
            for x0, y0, x1, y1 in np.round(boxes[valid] * scale).astype(int):
                cv2.rectangle(panel, (x0, y0), (x1 - 1, y1 - 1), color, width)


def layer_panels(image: np.ndarray, maps: dict, i: int, scale: float, per_head: bool) -> list[list]:
    """Rows of (title, panel) for layer ``i``: the heatmap with all heads' boxes, then (per_head) one panel per head."""
    heat = colorize(cv2.resize(maps["heatmaps"][i], image.shape[1::-1], interpolation=cv2.INTER_LINEAR))
    base = cv2.addWeighted(image, 1 - HEAT_ALPHA, heat, HEAT_ALPHA, 0)
    selections = maps["selections"].get(i, [])
    if not selections or not selections[0]["topk"]:
        return [[(f"layer {i}", base)]]
    heads = selections[0]["coarse_index"].shape[0]
    merged = base.copy()
    for s in selections:
        draw_selection(merged, s, scale, list(range(heads)))
    rows = [[(f"layer {i} PST, top-{selections[0]['topk']}, {heads} head(s)", merged)]]
    if per_head:
        row = []
        for h in range(heads):
            panel = base.copy()
            for s in selections:
                draw_selection(panel, s, scale, [h])
            row.append((f"layer {i} head {h}", panel))
        rows.append(row)
    return rows


def render(image: np.ndarray, maps: dict, per_head: bool = False, panel_height: int = 480):
    """Compose the figure: input and layer heatmaps in the first row, per-head panels in further rows.

    Returns:
        The BGR canvas and its layout {title: (x, y, scale)}: the panel's top-left pixel and image -> panel scale.
    """
    scale = panel_height / image.shape[0]
    small = cv2.resize(image, (round(image.shape[1] * scale), panel_height), interpolation=cv2.INTER_AREA)
    first, more = [("input", small)], []
    for i in maps["heatmaps"]:
        rows = layer_panels(small, maps, i, scale, per_head)
        first += rows[0]
        more += rows[1:]
    grid = [first, *more]
    width = max(len(r) for r in grid) * (small.shape[1] + GAP) - GAP
    canvas = np.full((len(grid) * (TITLE_HEIGHT + panel_height + GAP) - GAP, width, 3), 255, np.uint8)
    layout = {}
    for r, row in enumerate(grid):
        for c, (title, panel) in enumerate(row):
            x, y = c * (small.shape[1] + GAP), r * (TITLE_HEIGHT + panel_height + GAP) + TITLE_HEIGHT
            canvas[y : y + panel_height, x : x + small.shape[1]] = panel
            cv2.putText(canvas, title, (x + 4, y - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
            layout[title] = (x, y, scale)
    return canvas, layout


def image_files(source: str | Path) -> list[Path]:
    """An image file, or the image files of a folder (sorted)."""
    source = Path(check_type(source, "source", (str, Path), "an image file or a folder of images", "heatmap"))
    if source.is_file() and source.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(
            f"heatmap: source {str(source)!r} is not an image ({source.suffix or 'no suffix'}); give an image file "
            f"({', '.join(IMAGE_SUFFIXES)}) or a folder of images."
        )
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not files or not all(p.is_file() for p in files):
        raise FileNotFoundError(f"heatmap: no image found at source {str(source)!r}.")
    return files


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 (h, w, 3) image, or a ValueError naming a file OpenCV cannot decode."""
    image = cv2.imread(str(path))
    if image is None:
        raise ValueError(f"heatmap: cannot decode image {str(path)!r} (damaged, or not an image despite its suffix).")
    return image


def save_heatmaps(
    model, source, project="runs/pst_heatmap", topk=None, layers=None, per_head=False, imgsz=None, panel_height=480
) -> list[Path]:
    """Write ``project/<image stem>.png`` for each image of ``source`` (panels ``panel_height`` pixels high)."""
    files = image_files(source)  # checked before the model loads
    check_int(panel_height, "panel_height", "heatmap", minimum=16)
    check_bool(per_head, "per_head", "heatmap")
    model = load_model(model)
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        image = read_image(path)
        canvas, _ = render(image, attention_maps(model, image, topk, layers, imgsz), per_head, panel_height)
        out = project / f"{path.stem}.png"
        cv2.imwrite(str(out), canvas)
        written.append(out)
    return written


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments (Ultralytics style) -> keyword arguments of :func:`save_heatmaps`."""
    known = {"model", "source", "layers", "topk", "per_head", "project", "imgsz", "panel_height"}
    kwargs = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(kwargs) != len(argv) or kwargs.keys() - known or not {"model", "source"} <= kwargs.keys():
        raise SystemExit(f"pst-yolo heatmap: bad arguments {argv}.\n{USAGE}")
    for key, minimum in (("topk", 0), ("imgsz", STRIDE), ("panel_height", 16)):
        if key in kwargs:
            kwargs[key] = parse_int(key, kwargs[key], minimum)
    if "layers" in kwargs:
        kwargs["layers"] = [parse_int("layers", v) for v in kwargs["layers"].strip("[]").split(",")]
    if "per_head" in kwargs:
        value = kwargs["per_head"].lower()
        if value not in ("true", "false", "1", "0"):
            raise SystemExit(f"pst-yolo heatmap: per_head must be True or False, got '{kwargs['per_head']}'.")
        kwargs["per_head"] = value in ("true", "1")
    return kwargs


def parse_int(key: str, text: str, minimum: int | None = None) -> int:
    """``key=text`` -> an integer of at least ``minimum``, or SystemExit naming the key."""
    try:
        value = int(text)
    except ValueError:
        raise SystemExit(f"pst-yolo heatmap: {key} must be an integer, got '{text}'.") from None
    try:
        return check_int(value, key, "pst-yolo heatmap", minimum=minimum)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    """``pst-yolo heatmap model=... source=... [layers=...] [topk=K] [per_head=True] [imgsz=N] [project=DIR]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    for path in save_heatmaps(**parse_args(args)):
        print(f"pst-yolo heatmap: wrote {path}")


if __name__ == "__main__":
    main()
