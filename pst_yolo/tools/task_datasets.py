"""Offline segmentation, pose and oriented-box data sets made from the same real handwritten digits as the demo set.

Each image is composed like ``pst_yolo.tools.datasets.build_digits_detection`` (scikit-learn's 1797 real 8x8 digit
scans upscaled and blended onto textured backgrounds; train and val from disjoint scans), and every label is derived
from the ink of the digit it describes, in the formats Ultralytics reads:

- ``segment``: one polygon per digit, the outline of its ink (alpha > ``INK_THRESHOLD``). A digit whose ink falls
  apart into several pieces is joined into one polygon by Ultralytics' own ``merge_multi_segment`` (as its COCO
  converter does); holes (the inside of 0, 6, 8, 9) are part of the polygon, which YOLO's format cannot punch out.
- ``pose``: five keypoints per digit, the ink's extreme points (top, right, bottom, left: the pixels of the first
  / last ink row or column, at their mean position along it) and its centre of mass, all visible. A horizontal flip
  swaps right and left, so ``flip_idx`` is ``[0, 3, 2, 1, 4]``; ``kpt_names`` names them.
- ``obb``: each digit rotated by a random angle in +-``MAX_ANGLE`` degrees before it is pasted; the oriented box is
  the digit's upright tight ink box turned by that angle (``cls x1 y1 ... x4 y4``, normalised). Angles stay within
  +-60 degrees so that a 6 never reads as a 9.
- ``semantic``: a PNG class map per image (``masks/{train,val}``, ``masks_dir: masks``): the digit's class on its ink
  (alpha > ``SURE_INK``), ``background`` (class 10) off it, and Ultralytics' ignore label 255 on the blended edge
  between (``INK_THRESHOLD`` < alpha <= ``SURE_INK``), where neither class is right.
- ``depth``: a scene in metres, written as a 16-bit PNG per image (``depth/{train,val}``, ``depth_scale: 1000``): a
  ground plane receding from 2 m (bottom row) to 5 m (top row), and each digit a cut-out standing at its own depth,
  inversely proportional to its size (``DIGIT_DEPTH_AT_FULL_SIZE``); haze darkens every pixel with its depth, so depth
  can be read from size, position and brightness.

Examples:
    >>> import tempfile
    >>> build_digits_task(tempfile.mkdtemp(), "pose", train_images=2, val_images=1, imgsz=64).name
    'data.yaml'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .datasets import (
    DIGIT_NAMES,
    INK_THRESHOLD,
    MAX_BOX_OVERLAP,
    DigitLayout,
    box_iou,
    textured_background,
    write_train_val,
    write_yaml,
)

TASKS = ("segment", "pose", "obb", "semantic", "depth")
MAX_ANGLE = 60.0  # degrees; larger turns would make 6 and 9 the same shape
KEYPOINT_NAMES = ["top", "right", "bottom", "left", "centroid"]
FLIP_IDX = [0, 3, 2, 1, 4]  # a horizontal flip swaps the right and left extreme points
BACKGROUND_CLASS = 10  # semantic class of every pixel off the digits
IGNORE_LABEL = 255  # Ultralytics' semantic ignore label
SURE_INK = 0.6  # alpha above which a pixel is the digit's for semantic masks and depth
DEPTH_SCALE = 1000  # depth PNG value per metre (Ultralytics' default depth_scale)
PLANE_DEPTH = (5.0, 2.0)  # metres at the top and the bottom row of the ground plane
DIGIT_DEPTH_AT_FULL_SIZE = 0.3  # metres: a digit as tall as the image; depth = 0.3 * image side / digit side
HAZE_DISTANCE = 8.0  # metres over which haze dims light to 1/e


@dataclass
class PlacedDigit:
    """One digit pasted on a canvas.

    Attributes:
        cls: Digit class 0-9.
        alpha: (s, s) float32 ink opacity of the pasted (possibly rotated) patch.
        x, y: Top-left pixel of the patch on the canvas.
        corners: (4, 2) float32 corners of the oriented ink box in canvas pixels (rotated digits), else None.
    """

    cls: int
    alpha: np.ndarray
    x: int
    y: int
    corners: np.ndarray | None = None

    def ink(self) -> tuple[np.ndarray, np.ndarray]:
        """Canvas pixel coordinates (rows, cols) of the ink pixels."""
        rows, cols = np.nonzero(self.alpha > INK_THRESHOLD)
        return rows + self.y, cols + self.x


def rotated_patch(alpha: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Turn an upright ink patch by ``angle`` degrees (counter-clockwise) inside a square large enough to hold it.

    Args:
        alpha: (s, s) float32 ink opacity, upright.
        angle: Rotation in degrees.

    Returns:
        patch: (d, d) float32 rotated opacity, d = ceil(s * sqrt(2)).
        corners: (4, 2) float32 corners of the upright tight ink box after rotation, in patch pixels.
    """
    import cv2

    s = alpha.shape[0]
    d = int(np.ceil(s * np.sqrt(2.0)))
    pad = (d - s) // 2
    canvas = np.zeros((d, d), np.float32)
    canvas[pad : pad + s, pad : pad + s] = alpha
    rows, cols = np.nonzero(canvas > INK_THRESHOLD)
    x1, y1, x2, y2 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    box = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
    turn = cv2.getRotationMatrix2D((d / 2, d / 2), angle, 1.0)  # (2, 3)
    patch = cv2.warpAffine(canvas, turn, (d, d), flags=cv2.INTER_LINEAR)
    return np.clip(patch, 0.0, 1.0), box @ turn[:, :2].T + turn[:, 2]


def compose_task_image(
    rng: np.random.Generator, alphas: np.ndarray, classes: np.ndarray, size: int, layout: DigitLayout, rotate: bool
) -> tuple[np.ndarray, list[PlacedDigit]]:
    """One image with several digits, each kept with its ink so that any label can be derived from it.

    Args:
        rng: Random generator (all randomness comes from it).
        alphas: (M, 8, 8) ink maps to draw from.
        classes: (M,) their digit classes.
        size: Image side in pixels.
        layout: Digit count and size range (the side of the upright digit).
        rotate: Turn each digit by a random angle (oriented boxes).

    Returns:
        image: (size, size, 3) uint8 BGR image.
        digits: The pasted digits.
    """
    import cv2

    image = textured_background(rng, size)
    digits: list[PlacedDigit] = []
    for _ in range(int(rng.integers(layout.min_digits, layout.max_digits + 1))):
        side = int(rng.integers(int(layout.min_side * size), int(layout.max_side * size) + 1))
        i = int(rng.integers(len(alphas)))
        alpha = np.clip(cv2.resize(alphas[i], (side, side), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
        corners = None
        if rotate:
            alpha, corners = rotated_patch(alpha, float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)))
        s = alpha.shape[0]
        if s > size:
            continue
        x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
        placed = np.array([x, y, x + s, y + s], np.float32)
        if any(
            box_iou(placed, np.array([d.x, d.y, d.x + d.alpha.shape[0], d.y + d.alpha.shape[0]])) > MAX_BOX_OVERLAP
            for d in digits
        ):
            continue  # drop a digit rather than hide another one
        region = image[y : y + s, x : x + s]
        ink = np.clip(1.0 - region.mean((0, 1)) + rng.normal(0, 0.15, 3), 0.0, 1.0)
        region[:] = region * (1.0 - alpha[..., None]) + ink * alpha[..., None]
        digits.append(PlacedDigit(int(classes[i]), alpha, x, y, None if corners is None else corners + (x, y)))
    return (image * 255.0).round().astype(np.uint8), digits


def ink_polygon(digit: PlacedDigit) -> np.ndarray:
    """(P, 2) float32 outline of the digit's ink in canvas pixels (pixel centres), pieces joined into one polygon."""
    import cv2
    from ultralytics.data.converter import merge_multi_segment

    mask = (digit.alpha > INK_THRESHOLD).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pieces = [c.reshape(-1, 2).astype(np.float32) for c in sorted(contours, key=cv2.contourArea, reverse=True)]
    polygon = np.concatenate(merge_multi_segment(pieces)) if len(pieces) > 1 else pieces[0]
    return polygon + (digit.x + 0.5, digit.y + 0.5)


def extreme_keypoints(digit: PlacedDigit) -> np.ndarray:
    """(5, 2) float32 keypoints in canvas pixels: top, right, bottom, left extreme ink points and the centre of mass.

    Each extreme point is the mean position of the ink pixels in the first/last ink row or column (pixel centres).
    """
    rows, cols = digit.ink()
    rows, cols = rows + 0.5, cols + 0.5
    top, bottom, left, right = rows == rows.min(), rows == rows.max(), cols == cols.min(), cols == cols.max()
    weights = digit.alpha[digit.alpha > INK_THRESHOLD]
    return np.array(
        [
            [cols[top].mean(), rows.min()],
            [cols.max(), rows[right].mean()],
            [cols[bottom].mean(), rows.max()],
            [cols.min(), rows[left].mean()],
            [np.average(cols, weights=weights), np.average(rows, weights=weights)],
        ],
        np.float32,
    )


def tight_box(digit: PlacedDigit) -> np.ndarray:
    """(x1, y1, x2, y2) tight pixel box of the digit's ink."""
    rows, cols = digit.ink()
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def label_row(digit: PlacedDigit, task: str, size: int) -> str:
    """One Ultralytics label line for ``digit`` on a ``size`` x ``size`` image (coordinates normalised to [0, 1])."""
    if task == "segment":
        points = ink_polygon(digit)
    elif task == "obb":
        points = digit.corners
    elif task == "pose":
        x1, y1, x2, y2 = tight_box(digit)
        box = [(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size]
        keypoints = [f"{x / size:.6f} {y / size:.6f} 2" for x, y in extreme_keypoints(digit)]  # 2: visible
        return " ".join([str(digit.cls), *(f"{v:.6f}" for v in box), *keypoints])
    else:
        raise ValueError(f"task must be one of {TASKS}, got '{task}'")
    return " ".join([str(digit.cls), *(f"{v:.6f}" for v in np.clip(points / size, 0.0, 1.0).ravel())])


def semantic_mask(digits: list[PlacedDigit], size: int) -> np.ndarray:
    """(size, size) uint8 class map: digit class on sure ink, ``IGNORE_LABEL`` on its blended edge, else background."""
    mask = np.full((size, size), BACKGROUND_CLASS, np.uint8)
    for digit in digits:
        s = digit.alpha.shape[0]
        region = mask[digit.y : digit.y + s, digit.x : digit.x + s]
        region[digit.alpha > INK_THRESHOLD] = IGNORE_LABEL
        region[digit.alpha > SURE_INK] = digit.cls
    return mask


def depth_map(digits: list[PlacedDigit], size: int) -> np.ndarray:
    """(size, size) float32 depth in metres: the ground plane, and each digit's sure ink at its own depth."""
    depth = np.repeat(np.linspace(*PLANE_DEPTH, size, dtype=np.float32)[:, None], size, axis=1)
    for digit in digits:
        s = digit.alpha.shape[0]
        region = depth[digit.y : digit.y + s, digit.x : digit.x + s]
        region[digit.alpha > SURE_INK] = DIGIT_DEPTH_AT_FULL_SIZE * size / s
    return depth


def compose_labelled_image(
    rng: np.random.Generator, alphas: np.ndarray, classes: np.ndarray, task: str, size: int, layout: DigitLayout
) -> tuple[np.ndarray, list[str] | np.ndarray]:
    """One image of ``task`` and its label: text rows (segment, pose, obb), a class map or a uint16 depth PNG map."""
    image, digits = compose_task_image(rng, alphas, classes, size, layout, rotate=task == "obb")
    if task == "semantic":
        return image, semantic_mask(digits, size)
    if task == "depth":
        depth = depth_map(digits, size)
        hazy = image * np.exp(-depth / HAZE_DISTANCE)[..., None]
        return hazy.round().astype(np.uint8), np.round(depth * DEPTH_SCALE).astype(np.uint16)
    return image, [label_row(d, task, size) for d in digits]


def build_digits_task(
    root: str | Path,
    task: str,
    train_images: int = 300,
    val_images: int = 60,
    imgsz: int = 160,
    seed: int = 0,
    layout: DigitLayout | None = None,
) -> Path:
    """Build the handwritten-digits set for ``task`` under ``root``; deterministic per seed.

    Args:
        root: Output folder (created; existing files of the same names are overwritten).
        task: ``segment``, ``pose``, ``obb``, ``semantic`` or ``depth``.
        train_images: Number of training images.
        val_images: Number of validation images.
        imgsz: Side of the square images in pixels.
        seed: Seed for the scan split, the layout and the backgrounds.
        layout: Digits per image and their size range (fractions of ``imgsz``); None: ``DigitLayout()``.

    Returns:
        Path of the written ``data.yaml`` (absolute ``path``; pose sets add ``kpt_shape``, ``flip_idx``, ``kpt_names``;
        semantic sets ``masks_dir`` and the class ``background``; depth sets ``depth_scale``).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got '{task}'")
    layout = layout or DigitLayout()
    root = Path(root)
    label_folder = {"semantic": "masks", "depth": "depth"}.get(task, "labels")
    compose = partial(compose_labelled_image, task=task, size=imgsz, layout=layout)
    write_train_val(root, train_images, val_images, seed, compose, label_folder)
    content = {"path": str(root.resolve()), "train": "images/train", "val": "images/val", "names": DIGIT_NAMES}
    if task == "pose":
        content |= {
            "kpt_shape": [len(KEYPOINT_NAMES), 3],
            "flip_idx": FLIP_IDX,
            "kpt_names": {c: list(KEYPOINT_NAMES) for c in DIGIT_NAMES},
        }
    elif task == "semantic":
        content |= {"masks_dir": label_folder, "names": {**DIGIT_NAMES, BACKGROUND_CLASS: "background"}}
    elif task == "depth":
        content |= {"nc": 1, "names": {0: "depth"}, "depth_scale": DEPTH_SCALE}
    header = f"# pst-yolo: handwritten digits (scikit-learn) on textures, {task} labels from the digits' ink\n"
    return write_yaml(root / "data.yaml", content, header)
