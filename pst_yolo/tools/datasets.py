"""Offline detection data sets built from real data bundled with scikit-learn, and checks of the paper's data sets.

``build_digits_detection`` composites scikit-learn's handwritten digits (UCI optical recognition of handwritten
digits, 1797 real 8x8 scans of 43 writers) at random positions and sizes onto noisy, textured backgrounds and
writes an Ultralytics YOLO data set: ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` (one
``class x_center y_center width height`` row per digit, normalised to [0, 1], class = the digit) and a
``data.yaml`` with an absolute ``path``. Train and val images draw their digits from disjoint scans, so validation
measures generalisation to unseen handwriting.

``missing_coco_paths``, ``missing_imagenet_paths``, ``cuda_device_problem`` and ``exit_unless_ready`` check the inputs
of the reproduction
scripts in ``scripts/`` (COCO / ImageNet in Ultralytics' layouts, the GPUs asked for).

Examples:
    >>> import tempfile
    >>> yaml_path = build_digits_detection(tempfile.mkdtemp(), train_images=2, val_images=1, imgsz=64)
    >>> yaml_path.name
    'data.yaml'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

DIGIT_NAMES = {i: str(i) for i in range(10)}
VAL_SCAN_FRACTION = 0.2  # share of the 1797 digit scans reserved for val images
MAX_BOX_OVERLAP = 0.1  # largest IoU between two pasted digits (keeps every label visible)
INK_THRESHOLD = 0.25  # alpha above which a pixel counts as ink for the tight box


@dataclass(frozen=True)
class DigitLayout:
    """How digits are placed on a canvas: counts and side lengths as fractions of the image size."""

    min_digits: int = 1
    max_digits: int = 4
    min_side: float = 0.15
    max_side: float = 0.35


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ink alpha maps.

    Returns:
        alphas: (1797, 8, 8) float32 in [0, 1] (1 = full ink).
        labels: (1797,) int digit classes 0-9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(int)


def split_scans(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/val index sets over ``n`` digit scans (a seeded shuffle, ``VAL_SCAN_FRACTION`` to val)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * VAL_SCAN_FRACTION))
    return order[n_val:], order[:n_val]


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random colour gradient plus low-frequency blotches plus pixel noise.

    Returns:
        (size, size, 3) float32 image in [0, 1].
    """
    import cv2

    base = rng.uniform(0.0, 0.6, 3)
    tilt = rng.uniform(-0.25, 0.25, (2, 3))
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    image = base + ramp[:, None, None] * tilt[0] + ramp[None, :, None] * tilt[1]
    cells = int(rng.integers(3, 9))
    blotches = cv2.resize(rng.normal(0.0, 0.12, (cells, cells, 3)).astype(np.float32), (size, size))
    noise = rng.normal(0.0, rng.uniform(0.02, 0.08), (size, size, 3))
    return np.clip(image + blotches + noise, 0.0, 1.0).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two pixel boxes given as (x1, y1, x2, y2)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def paste_digit(image: np.ndarray, alpha: np.ndarray, x: int, y: int, ink: np.ndarray) -> np.ndarray:
    """Blend ``ink`` into ``image`` through ``alpha`` at top-left (x, y) in place.

    Args:
        image: (H, W, 3) float32 canvas.
        alpha: (s, s) float32 ink opacity in [0, 1].
        x, y: Top-left pixel of the paste.
        ink: (3,) ink colour.

    Returns:
        The tight pixel box (x1, y1, x2, y2) of the pasted ink.
    """
    s = alpha.shape[0]
    region = image[y : y + s, x : x + s]
    region[:] = region * (1.0 - alpha[..., None]) + ink * alpha[..., None]
    rows, cols = np.nonzero(alpha > INK_THRESHOLD)
    return np.array([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1], dtype=np.float32)


def compose_image(
    rng: np.random.Generator, alphas: np.ndarray, classes: np.ndarray, size: int, layout: DigitLayout
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One training image: several digits from ``alphas`` on a textured background.

    Args:
        rng: Random generator (all randomness comes from it).
        alphas: (M, 8, 8) ink maps to draw from.
        classes: (M,) their digit classes.
        size: Image side in pixels.
        layout: Digit count and size range.

    Returns:
        image: (size, size, 3) uint8 BGR image.
        boxes: [(class, (x1, y1, x2, y2) pixel box)] for every pasted digit.
    """
    import cv2

    image = textured_background(rng, size)
    boxes: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(layout.min_digits, layout.max_digits + 1))):
        side = int(rng.integers(int(layout.min_side * size), int(layout.max_side * size) + 1))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        placed = np.array([x, y, x + side, y + side], dtype=np.float32)
        if any(box_iou(placed, b) > MAX_BOX_OVERLAP for _, b in boxes):
            continue  # drop a digit rather than hide another one
        i = int(rng.integers(len(alphas)))
        alpha = np.clip(cv2.resize(alphas[i], (side, side), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
        ink = np.clip(1.0 - image[y : y + side, x : x + side].mean((0, 1)) + rng.normal(0, 0.15, 3), 0.0, 1.0)
        boxes.append((int(classes[i]), paste_digit(image, alpha, x, y, ink)))
    return (image * 255.0).round().astype(np.uint8), boxes


def yolo_label_rows(boxes: list[tuple[int, np.ndarray]], size: int) -> list[str]:
    """YOLO label lines ``cls xc yc w h`` (normalised) for pixel boxes on a ``size`` x ``size`` image."""
    rows = []
    for cls, (x1, y1, x2, y2) in boxes:
        xc, yc, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
        rows.append(f"{cls} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return rows


def write_split(
    root: Path,
    split: str,
    count: int,
    compose_labelled: Callable[[], tuple[np.ndarray, list[str] | np.ndarray]],
    label_folder: str = "labels",
) -> None:
    """Write ``count`` images from ``compose_labelled() -> (image, label)`` under ``root/images/split``.

    A label given as rows of text goes to ``root/label_folder/split/*.txt``; one given as an (H, W) array (a class
    mask or an encoded depth map, uint8 or uint16) goes to ``root/label_folder/split/*.png``, as Ultralytics'
    semantic and depth loaders read them.
    """
    import cv2

    image_dir, label_dir = root / "images" / split, root / label_folder / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        image, label = compose_labelled()
        cv2.imwrite(str(image_dir / f"{split}_{n:05d}.png"), image)
        if isinstance(label, np.ndarray):
            cv2.imwrite(str(label_dir / f"{split}_{n:05d}.png"), label)
        else:
            (label_dir / f"{split}_{n:05d}.txt").write_text("\n".join(label) + "\n")


def write_train_val(
    root: Path, train_images: int, val_images: int, seed: int, compose_labelled: Callable, label_folder: str = "labels"
) -> None:
    """Write the train and val splits from disjoint digit scans (deterministic for ``seed``).

    ``compose_labelled(rng, alphas, classes) -> (image, label)`` draws one image from the split's scans; labels go to
    ``root/label_folder`` (see ``write_split``).
    """
    alphas, classes = load_digit_scans()
    train_idx, val_idx = split_scans(len(alphas), seed)
    rng = np.random.default_rng(seed)
    for split, count, idx in (("train", train_images, train_idx), ("val", val_images, val_idx)):
        write_split(root, split, count, partial(compose_labelled, rng, alphas[idx], classes[idx]), label_folder)


def write_yaml(path: Path, content: dict, header: str = "") -> Path:
    """Write ``content`` as YAML (keys in order) after a ``header`` comment; return ``path``."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(content, sort_keys=False))
    return path


def write_data_yaml(root: Path) -> Path:
    """Write ``root/data.yaml`` (absolute ``path``, 10 digit classes) and return its path."""
    content = {"path": str(root.resolve()), "train": "images/train", "val": "images/val", "names": DIGIT_NAMES}
    return write_yaml(root / "data.yaml", content, "# pst-yolo demo: handwritten digits (scikit-learn) on textures\n")


def build_digits_detection(
    root: str | Path,
    train_images: int = 300,
    val_images: int = 60,
    imgsz: int = 160,
    seed: int = 0,
    layout: DigitLayout = DigitLayout(),
) -> Path:
    """Build the handwritten-digits detection set under ``root`` (deterministic for a given ``seed``).

    Args:
        root: Output folder (created; existing files of the same names are overwritten).
        train_images: Number of training images.
        val_images: Number of validation images.
        imgsz: Side of the square images in pixels.
        seed: Seed for the scan split, the layout and the backgrounds.
        layout: Digits per image and their size range (fractions of ``imgsz``).

    Returns:
        Path of the written ``data.yaml``.
    """

    def compose_labelled(rng, alphas, classes):
        image, boxes = compose_image(rng, alphas, classes, imgsz, layout)
        return image, yolo_label_rows(boxes, imgsz)

    root = Path(root)
    write_train_val(root, train_images, val_images, seed, compose_labelled)
    return write_data_yaml(root)


def missing_coco_paths(root: str | Path, splits: tuple[str, ...] = ("train2017", "val2017")) -> list[str]:
    """What an Ultralytics-format COCO 2017 folder at ``root`` lacks for ``splits`` (empty list: complete).

    The layout (Ultralytics' ``coco.yaml``, from ``coco2017labels-segments.zip`` plus the image zips)::

        root/train2017.txt, root/val2017.txt            image lists
        root/images/{train2017,val2017}/*.jpg           images
        root/labels/{train2017,val2017}/*.txt           YOLO labels
        root/annotations/instances_val2017.json         COCO-API ground truth (val2017 only)
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root} (the COCO folder itself)"]
    missing = []
    for split in splits:
        for path in (root / f"{split}.txt", root / "images" / split, root / "labels" / split):
            if not path.exists():
                missing.append(str(path))
        if (root / "images" / split).is_dir() and not any((root / "images" / split).iterdir()):
            missing.append(f"{root / 'images' / split}/*.jpg (folder is empty)")
    if "val2017" in splits and not (root / "annotations" / "instances_val2017.json").is_file():
        missing.append(str(root / "annotations" / "instances_val2017.json"))
    return missing


def missing_imagenet_paths(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """What an Ultralytics-format ImageNet folder at ``root`` lacks for ``splits`` (empty list: complete).

    The layout (Ultralytics' classification folder format): ``root/{train,val}/<class folder>/*.JPEG``, the same
    class folders (e.g. the 1000 WordNet ids ``n01440764`` ...) in every split.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root} (the ImageNet folder itself)"]
    missing, classes = [], {}
    for split in splits:
        folder = root / split
        classes[split] = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
        if not classes[split]:
            missing.append(f"{folder}/<class>/ (no class folders)")
    found = [c for c in classes.values() if c]
    if len(found) > 1 and any(c != found[0] for c in found):
        missing.append(f"the same class folders in {', '.join(str(root / s) for s in splits)}")
    return missing


def write_coco_data_yaml(root: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/coco.yaml``: Ultralytics' COCO data set definition with an absolute ``path`` and no download.

    Ultralytics switches to COCO-API metrics (and COCO's 91 category ids in ``predictions.json``) only when the val
    list's resolved path contains ``coco`` and ends in ``val2017.txt``.

    Raises:
        SystemExit: The resolved folder name does not contain ``coco``.
    """
    from ultralytics.utils import ROOT, YAML

    root = Path(root).resolve()
    if "coco" not in str(root / "val2017.txt"):
        raise SystemExit(
            f"{root}: Ultralytics recognises COCO only when its path contains 'coco'; make a link, e.g. "
            f"ln -s {root} {root.parent / 'coco'}, and pass that."
        )
    names = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    content = {"path": str(root), "train": "train2017.txt", "val": "val2017.txt", "names": names}
    header = "# Ultralytics' coco.yaml with an absolute path and no download, written by pst-yolo's scripts\n"
    return write_yaml(Path(out_dir) / "coco.yaml", content, header)


def cuda_device_problem(device: str) -> str | None:
    """Why the Ultralytics ``device`` string (``"0,1,2,3"``, ``"cpu"``) cannot run here, or None if it can."""
    import torch

    if device.strip().lower() in ("cpu", "mps"):
        return None
    ids = [int(d) for d in device.replace(" ", "").split(",") if d != ""]
    available = torch.cuda.device_count()
    if len(ids) > available or (ids and max(ids) >= available):
        return f"device={device} asks for {len(ids)} GPU(s) (ids {ids}), but torch.cuda.device_count() is {available}."
    return None


def exit_unless_ready(dataset: str, missing: list[str], device: str, device_hint: str) -> None:
    """Exit with a clear message when ``dataset`` has ``missing`` paths or ``device`` asks for GPUs not present."""
    if missing:
        raise SystemExit(f"{dataset} incomplete; missing:\n  " + "\n  ".join(missing))
    problem = cuda_device_problem(device)
    if problem:
        raise SystemExit(f"{problem} {device_hint}")
