"""End to end through the stock ``yolo`` CLI on a tiny offline dataset of real images (slow)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from export_helpers import assert_standard_graph, letterboxed, max_abs_diff, ort_output, reference_model, torch_output
from ultralytics.utils import ASSETS

BIN = Path(sys.executable).parent
ENV = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "true"}
pytestmark = pytest.mark.slow


def make_dataset(root: Path, n_train=8, n_val=4, size=128) -> Path:
    """Scenes cut from bus.jpg with a zidane.jpg patch pasted in (class 0) and a flipped bus patch (class 1)."""
    rng = np.random.default_rng(0)
    bus, zidane = cv2.imread(str(ASSETS / "bus.jpg")), cv2.imread(str(ASSETS / "zidane.jpg"))
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(count):
            y, x = rng.integers(0, bus.shape[0] - size), rng.integers(0, bus.shape[1] - size)
            scene = bus[y : y + size, x : x + size].copy()
            labels = []
            for cls, source in ((0, zidane), (1, cv2.flip(bus, 1))):
                w, h = rng.integers(24, 56, size=2)
                patch = cv2.resize(source, (int(w), int(h)))
                px, py = rng.integers(0, size - w), rng.integers(0, size - h)
                scene[py : py + h, px : px + w] = patch
                labels.append(
                    f"{cls} {(px + w / 2) / size:.6f} {(py + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}"
                )
            cv2.imwrite(str(root / split / "images" / f"{i}.jpg"), scene)
            (root / split / "labels" / f"{i}.txt").write_text("\n".join(labels) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: train/images\nval: val/images\nnames:\n  0: person\n  1: bus\n")
    return data


def yolo(*args, cwd, exe="yolo"):
    result = subprocess.run([str(BIN / exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{exe} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


RAW_OUTPUTS = """
    import sys, torch
    from ultralytics import YOLO
    import pst_yolo
    model = YOLO(sys.argv[1]).model.float().eval()
    x = torch.load(sys.argv[2])
    outs = {}
    for k in (0, 8):
        pst_yolo.set_topk(model, k)
        outs[k] = model(x)[0]
    torch.save(outs, sys.argv[3])
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_dataset(root / "data")
    yolo(
        "train",
        "model=yolo11n-pst.yaml",
        f"data={data}",
        "epochs=2",
        "imgsz=96",
        "batch=4",
        "workers=0",
        "device=cpu",
        "plots=False",
        f"project={root / 'runs'}",
        "name=train",
        "seed=0",
        cwd=root,
    )
    best = root / "runs" / "train" / "weights" / "best.pt"
    assert best.exists()
    return root, data, best


def test_val_rect_and_odd_size(trained):
    root, data, best = trained
    out = yolo(
        "val", f"model={best}", f"data={data}", "imgsz=100", "rect=True", "batch=2", "workers=0", "device=cpu", cwd=root
    )
    assert "all" in out


def test_predict_bus_and_topk_key(trained):
    root, _, best = trained
    yolo(
        "predict",
        f"model={best}",
        f"source={ASSETS / 'bus.jpg'}",
        "imgsz=200",
        f"project={root / 'runs'}",
        "name=pred",
        cwd=root,
    )
    assert (root / "runs" / "pred" / "bus.jpg").exists()
    out = yolo(
        "predict",
        f"model={best}",
        f"source={ASSETS / 'bus.jpg'}",
        "imgsz=160",
        "topk=0",
        "save=False",
        cwd=root,
        exe="pst-yolo",
    )
    assert "bus.jpg" in out


def test_reload_in_fresh_process_is_deterministic_and_fine_attention_matters(trained):
    root, _, best = trained
    image = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (160, 224))[..., ::-1]
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 224, 160): P5 is 7x5
    torch.save(x, root / "x.pt")
    runs = []
    for i in range(2):
        out_file = root / f"raw{i}.pt"
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(RAW_OUTPUTS), str(best), str(root / "x.pt"), str(out_file)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(torch.load(out_file))
    for k in (0, 8):
        assert torch.equal(runs[0][k], runs[1][k]), f"topk={k} differs between processes"
    assert not torch.equal(runs[0][0], runs[0][8]), "fine attention (topk=8) must change the output"


def test_cli_export_onnx_matches_torch(trained):
    """Stock ``yolo export`` of the trained best.pt (its YAML's k = 8) and ``pst-yolo export topk=0``: standard dynamic
    ONNX graphs that ONNX Runtime runs as PyTorch does at that k, on a shape other than the exported one."""
    pytest.importorskip("onnxruntime")
    root, _, best = trained
    x = letterboxed("bus.jpg", (96, 64))
    for k, exe in ((8, "yolo"), (0, "pst-yolo")):
        target = Path(shutil.copy(best, root / f"{exe}-export.pt"))
        extra = ["topk=0"] if exe == "pst-yolo" else []
        yolo("export", f"model={target}", "format=onnx", "imgsz=96", "dynamic=True", *extra, cwd=root, exe=exe)
        path = target.with_suffix(".onnx")
        assert_standard_graph(path, k)
        diff = max_abs_diff(torch_output(reference_model(best, k), x), ort_output(path, x), "detect", 96)
        print(f"\n[parity] ONNX dynamic detect, trained best.pt, {exe} export k={k} {tuple(x.shape)}: {diff:.2e}")
        assert diff < 1e-4


def test_ddp_entry_file_trains_in_fresh_interpreter(trained):
    """Run the file Ultralytics 8.4 writes for DDP workers (they unpickle the model) in a fresh interpreter, on CPU.

    The plugin's start-up hook is switched off: unpickling the model alone must bring pst_yolo in. (8.3.x workers
    rebuild from the YAML instead, which the stock `yolo train` run above covers through the start-up hook.)
    """
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.dist import generate_ddp_file

    root, data, _ = trained
    overrides = dict(
        model="yolo11n-pst.yaml",
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=4,
        workers=0,
        device="cpu",
        plots=False,
        project=str(root / "runs"),
        name="ddp",
        exist_ok=True,
        verbose=False,
    )
    trainer = DetectionTrainer(overrides=overrides)
    trainer.model = trainer.get_model(cfg="yolo11n-pst.yaml", verbose=False)
    entry = Path(generate_ddp_file(trainer))
    try:
        env = {**ENV, "PST_YOLO_DISABLE_HOOK": "1"}
        result = subprocess.run(
            [sys.executable, str(entry)], cwd=root, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-5000:]
        assert (root / "runs" / "ddp" / "weights" / "last.pt").exists()
    finally:
        entry.unlink()
        entry.with_suffix(".pt").unlink()
