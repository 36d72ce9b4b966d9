"""Converting checkpoints of the authors' Ultralytics fork: weights, kv layout, k=0 equality, stock loading.

The authors' checkpoint is built here: stand-ins with the authors' class paths, attribute names and layout (facts in
REFERENCE.md section 2), registered under ``ultralytics.nn.modules.block`` while saving so the pickle names them.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import ultralytics.nn.modules.block as block_module
from ultralytics import YOLO
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import DetectionModel

import pst_yolo
from pst_yolo.tools.convert import convert_checkpoint, kv_channel_order, main

AUTHORS_MODULE = "ultralytics.nn.modules.block"


class PSAttn(nn.Module):
    """The authors' PSAttn, k=0 path: kv channels interleaved per head, CPE upsampled bilinearly to the fine size."""

    __module__ = AUTHORS_MODULE

    def __init__(self, dim, num_heads, topk=0):
        super().__init__()
        self.num_heads, self.head_dim, self.topk = num_heads, dim // num_heads, topk
        self.q = Conv(dim, dim, 1, act=False)
        self.kv = Conv(dim, 2 * dim, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 7, 1, 3, g=dim, act=False)
        self.gate_conv1d = nn.Conv1d(2 * self.head_dim, self.head_dim, kernel_size=1)

    def forward(self, x, up):
        B, C, H, W = x.shape
        Hu, Wu = up.shape[2:]
        nh, d = self.num_heads, self.head_dim
        q = self.q(x).view(B, nh, d, H * W).transpose(-1, -2)  # (B, nh, N, d)
        kv = self.kv(up).view(B, nh, 2 * d, Hu * Wu).transpose(-1, -2)  # (B, nh, M, 2d): per head [K | V]
        k, v = kv.split(d, dim=3)
        out = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1) @ v  # (B, nh, N, d)
        out = out.transpose(2, 3).reshape(B, C, H, W)
        pe = self.pe(v.transpose(2, 3).reshape(B, C, Hu, Wu))
        return self.proj(out + F.interpolate(pe, size=(H, W), mode="bilinear", align_corners=False))


class PSAttnBlock(nn.Module):
    __module__ = AUTHORS_MODULE

    def __init__(self, dim, num_heads, mlp_ratio=2, topk=0):
        super().__init__()
        self.attn = PSAttn(dim, num_heads, topk)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(Conv(dim, hidden, 1), Conv(hidden, dim, 1, act=False))

    def forward(self, x, up):
        x = x + self.attn(x, up)
        return x + self.mlp(x)


class PST(nn.Module):
    __module__ = AUTHORS_MODULE

    def __init__(self, c1, c_up, c2, n=1, mlp_ratio=2.0, e=0.5, k=0):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cvup, self.cv2 = Conv(c1, c_, 1, 1), Conv(c_up, c_, 1, 1), Conv((1 + n) * c_, c2, 1)
        self.num_layers = n
        for i in range(n):
            self.add_module(f"attnlayer_{i}", PSAttnBlock(c_, c_ // 32, mlp_ratio, topk=k))

    def forward(self, xs):
        up = self.cvup(xs[1])
        y = [self.cv1(xs[0])]
        for i in range(self.num_layers):
            y.append(getattr(self, f"attnlayer_{i}")(y[-1], up))
        return self.cv2(torch.cat(y, 1))


def randomize(model: nn.Module) -> None:
    """Random weights of unit-scale activations, and random BatchNorm statistics (so every layout error shows)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                for t, low, high in ((m.weight, 0.5, 1.5), (m.running_var, 0.5, 1.5)):
                    t.uniform_(low, high)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)


def authors_model(cfg: str = "yolo11n-pst.yaml") -> DetectionModel:
    """An authors'-layout network: the shipped config, each PST swapped for the fork's class, random weights."""
    model = DetectionModel(cfg, verbose=False)
    for i, m in enumerate(model.model):
        if isinstance(m, pst_yolo.PST):
            c_ = m.cv1.conv.out_channels
            theirs = PST(m.cv1.conv.in_channels, m.cvup.conv.in_channels, m.cv2.conv.out_channels, len(m.blocks))
            assert theirs.cv2.conv.in_channels == (len(m.blocks) + 1) * c_
            theirs.i, theirs.f, theirs.type, theirs.np = m.i, m.f, "PST", m.np
            for bn in theirs.modules():  # the fork builds PST inside parse_model, so initialize_weights sets these
                if isinstance(bn, nn.BatchNorm2d):
                    bn.eps, bn.momentum = 1e-3, 0.03
            model.model[i] = theirs
    randomize(model)
    model.names = {i: f"class{i}" for i in range(model.yaml["nc"])}
    return model.eval()


@pytest.fixture
def authors_checkpoint(tmp_path, monkeypatch):
    """An authors'-format checkpoint file (pickled as ultralytics.nn.modules.block.PST/...) and its model."""
    for cls in (PST, PSAttnBlock, PSAttn):
        monkeypatch.setattr(block_module, cls.__name__, cls, raising=False)
    model = authors_model()
    path = tmp_path / "authors.pt"
    torch.save({"model": model, "ema": None, "train_args": {"imgsz": 64, "task": "detect"}, "epoch": -1}, path)
    for cls in (PST, PSAttnBlock, PSAttn):
        monkeypatch.delattr(block_module, cls.__name__)
    return path, model


def test_kv_channel_order():
    """Two heads: pst-yolo [K0 K1 | V0 V1] takes the authors' [K0 V0 K1 V1] blocks of 32."""
    order = kv_channel_order(128).view(4, 32)
    assert order[:, 0].tolist() == [0, 64, 32, 96]
    assert (order - order[:, :1] == torch.arange(32)).all()


def test_authors_checkpoint_needs_conversion(authors_checkpoint):
    """Stock loading cannot resolve the fork's classes (so the fixture really is the authors' format)."""
    path, _ = authors_checkpoint
    with pytest.raises(AttributeError, match="PST"):
        torch.load(path, weights_only=False)


def test_k0_outputs_match_authors_model(authors_checkpoint, tmp_path):
    path, source = authors_checkpoint
    dst = convert_checkpoint(path, tmp_path / "converted.pt", topk=0)
    converted = YOLO(dst).model.eval()
    assert sum(isinstance(m, pst_yolo.PST) for m in converted.modules()) == 2
    assert converted.names == source.names
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = source(x), converted(x)
    expected, got = (t[0] if isinstance(t, (tuple, list)) else t for t in (expected, got))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_gate_kept_on_request(authors_checkpoint, tmp_path):
    path, source = authors_checkpoint
    converted = YOLO(convert_checkpoint(path, tmp_path / "gated.pt", topk=8, keep_gate=True)).model
    ours = [m for m in converted.modules() if isinstance(m, pst_yolo.PSAttn)]
    theirs = [m for m in source.modules() if isinstance(m, PSAttn)]
    assert len(ours) == len(theirs) == 2 and all(m.topk == 8 for m in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.gate.weight, b.gate_conv1d.weight[..., 0])
        torch.testing.assert_close(a.gate.bias, b.gate_conv1d.bias)
        torch.testing.assert_close(a.fine_kv_var, b.kv.bn.running_var[kv_channel_order(a.fine_kv_var.numel())])
    dropped = YOLO(convert_checkpoint(path, tmp_path / "plain.pt")).model
    assert all(m.gate is None for m in dropped.modules() if isinstance(m, pst_yolo.PSAttn))


def test_convert_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="bad arguments"):
        main([str(tmp_path / "a.pt")])
    with pytest.raises(SystemExit, match="bad arguments"):
        main(["a.pt", "b.pt", "k=3"])


@pytest.mark.slow
def test_converted_checkpoint_runs_with_stock_yolo(authors_checkpoint, tmp_path):
    """A fresh interpreter runs stock ``yolo predict`` on the converted file (pst_yolo found by its start-up hook)."""
    from ultralytics.utils import ASSETS

    path, _ = authors_checkpoint
    dst = tmp_path / "converted.pt"
    main([str(path), str(dst), "topk=8"])
    yolo = os.path.join(os.path.dirname(sys.executable), "yolo")
    env = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    result = subprocess.run(
        [yolo, "predict", f"model={dst}", f"source={ASSETS / 'bus.jpg'}", "imgsz=96", f"project={tmp_path}", "name=p"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "p" / "bus.jpg").is_file()
