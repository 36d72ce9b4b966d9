"""Bad inputs get a clear error naming the culprit (or a correct, documented result); BN modes; non-finite inputs.

The sweep (``test_bad_input``) tries each public function, module, YAML row field and tool option with the values a
user could plausibly pass wrongly (wrong type, negative, zero, too large, swapped, missing, non-finite, wrong file
kind) and asserts the exception type and that the message names the argument or layer. ``len(SWEEP)`` is the count.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.tasks import DetectionModel

import pst_yolo
import pst_yolo.validation
from pst_yolo import PST, PSAttn, PSAttnBlock, set_backend, set_topk, use_backend
from pst_yolo.cli import main as cli_main
from pst_yolo.ops import (
    attention,
    coarse_attention_with_scores,
    coarse_key_scores,
    pyramid_sparse_attention,
    select_fine_tokens,
)
from pst_yolo.tools import convert, demo, heatmap, model_sizes, tensorrt_check
from pst_yolo.tools.bench.cli import parse_args as bench_args

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
TINY_YAML = """
nc: 2
scales: {n: [1.0, 1.0, 256], s: [1.0, 1.0, 256]}
backbone:
  - [-1, 1, Conv, [16, 3, 2]] # 0 /2
  - [-1, 1, Conv, [32, 3, 2]] # 1 /4
  - [-1, 1, Conv, [32, 3, 2]] # 2 /8
  - [-1, 1, Conv, [64, 3, 2]] # 3 /16
head:
  - [[2, 3], 1, PST, [64, 2.0, 0.5, 4]] # 4 fine /8 (layer 2), upper /16 (layer 3)
  - [[-1, 2], 1, Concat, [1]] # 5: fails on a swapped PST row unless the row is checked first
  - [[5], 1, Detect, [nc]] # 6
"""
PST_ROW = "[[2, 3], 1, PST, [64, 2.0, 0.5, 4]]"


# ------------------------------------------------------------------------------------------------ tiny inputs
def tokens(B=1, h=2, n=16, d=32, seed=0):
    return torch.randn(B, h, n, d, generator=torch.Generator().manual_seed(seed))


Q, K, V = tokens(n=16), tokens(n=4, seed=1), tokens(n=4, seed=2)  # fine 4x4 over coarse 2x2
KF, VF = tokens(n=16, seed=3), tokens(n=16, seed=4)
GRIDS = ((4, 4), (2, 2))


def psa(**changes):
    """Call pyramid_sparse_attention with valid arguments, some replaced by ``changes``."""
    kwargs = {"q": Q, "k": K, "v": V, "k_fine": KF, "v_fine": VF, "fine_hw": GRIDS[0], "coarse_hw": GRIDS[1], "topk": 4}
    return pyramid_sparse_attention(**{**kwargs, **changes})


def select(**changes):
    kwargs = {"scores": torch.rand(1, 2, 4), "fine_hw": GRIDS[0], "coarse_hw": GRIDS[1], "topk": 2, "threshold": 1e-6}
    return select_fine_tokens(**{**kwargs, **changes})


def pst_call(xs, **ctor):
    return PST(48, 80, 64, **ctor).eval()(xs)


FINE, UPPER = torch.randn(1, 48, 8, 8), torch.randn(1, 80, 4, 4)


def attn_call(x, up):
    return PSAttn(64, 2).eval()(x, up)


def tiny_yaml(tmp: Path, row: str = PST_ROW, name: str = "yolo99n-tiny.yaml", text: str = TINY_YAML) -> str:
    path = tmp / name
    path.write_text(text.replace(PST_ROW, row))
    return str(path)


def build(row: str, name: str = "yolo99n-tiny.yaml", text: str = TINY_YAML):
    def run(tmp: Path, _model=None):
        return DetectionModel(tiny_yaml(tmp, row, name, text), verbose=False)

    return run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return DetectionModel(tiny_yaml(tmp_path_factory.mktemp("tiny")), verbose=False).eval()


# ------------------------------------------------------------------------------------------------ the sweep
# Each case: (callable taking (tmp_path, tiny_model) -> anything, exception type, regex the message must match).
def case(fn, error, pattern, id):
    return pytest.param(fn, error, pattern, id=id)


OP_CASES = [
    case(
        lambda *_: psa(q=None), TypeError, r"pyramid_sparse_attention: q must be a floating-point tensor", "op q None"
    ),
    case(lambda *_: psa(q=Q.tolist()), TypeError, r"q must be a floating-point tensor", "op q list"),
    case(lambda *_: psa(q=Q.long()), TypeError, r"q must be a floating-point.*int64", "op q int tensor"),
    case(lambda *_: psa(q=Q[0]), ValueError, r"q must be a floating-point tensor with 4 dim", "op q 3-D"),
    case(lambda *_: psa(k=None), TypeError, r"k must be a floating-point tensor", "op k None"),
    case(lambda *_: psa(k=tokens(B=2, n=4)), ValueError, r"k must be \(B, h, M, d\)", "op k batch"),
    case(lambda *_: psa(k=tokens(n=4, d=16)), ValueError, r"k must be \(B, h, M, d\)", "op k head dim"),
    case(lambda *_: psa(k=tokens(h=3, n=4)), ValueError, r"k must be \(B, h, M, d\)", "op k heads"),
    case(lambda *_: psa(v=tokens(n=5)), ValueError, r"v must be \(B, h, M, dv\)", "op v tokens"),
    case(lambda *_: psa(v=V.double()), ValueError, r"v must be on cpu as torch.float32", "op v dtype"),
    case(lambda *_: psa(k_fine=None), ValueError, r"k_fine and v_fine are needed when topk > 0", "op k_fine None"),
    case(lambda *_: psa(v_fine=None), ValueError, r"k_fine and v_fine are needed", "op v_fine None"),
    case(lambda *_: psa(k_fine=tokens(n=9)), ValueError, r"k_fine must be \(B, h, N, d\)", "op k_fine tokens"),
    case(lambda *_: psa(v_fine=tokens(n=16, d=8)), ValueError, r"v_fine must be \(B, h, N, dv\)", "op v_fine dv"),
    case(lambda *_: psa(fine_hw=(4,)), TypeError, r"fine_hw must be \(height, width\)", "op fine_hw 1 value"),
    case(lambda *_: psa(fine_hw="4x4"), TypeError, r"fine_hw must be", "op fine_hw str"),
    case(lambda *_: psa(fine_hw=(4.0, 4)), TypeError, r"fine_hw must be", "op fine_hw float"),
    case(
        lambda *_: psa(fine_hw=(4, -4)),
        ValueError,
        r"fine_hw must be \(height, width\): two positive",
        "op fine_hw neg",
    ),
    case(lambda *_: psa(fine_hw=(0, 4)), ValueError, r"fine_hw must be", "op fine_hw zero"),
    case(lambda *_: psa(coarse_hw=None), TypeError, r"coarse_hw must be", "op coarse_hw None"),
    case(lambda *_: psa(fine_hw=(2, 2), coarse_hw=(4, 4)), ValueError, r"half.*swapped", "op grids swapped"),
    case(lambda *_: psa(coarse_hw=(1, 4)), ValueError, r"half the fine map", "op coarse not half"),
    case(lambda *_: psa(fine_hw=(3, 4)), ValueError, r"Token counts 16/4 do not match", "op grid vs tokens"),
    case(lambda *_: psa(topk=-1), ValueError, r"topk must be a non-negative integer, got -1", "op topk neg"),
    case(lambda *_: psa(topk="eight"), TypeError, r"topk must be a non-negative integer, got 'eight'", "op topk str"),
    case(lambda *_: psa(topk=2.5), TypeError, r"topk must be .* got 2.5", "op topk float"),
    case(lambda *_: psa(topk=True), TypeError, r"topk must be .* got True", "op topk bool"),
    case(lambda *_: psa(topk=None), TypeError, r"topk must be .* got None", "op topk None"),
    case(lambda *_: psa(threshold=NAN), ValueError, r"threshold must be a finite number >= 0 and <= 1", "op thr nan"),
    case(lambda *_: psa(threshold=INF), ValueError, r"threshold must be a finite number", "op thr inf"),
    case(lambda *_: psa(threshold=-0.1), ValueError, r"threshold must be .* got -0.1", "op thr neg"),
    case(lambda *_: psa(threshold=1.5), ValueError, r"threshold must be .* got 1.5", "op thr too large"),
    case(lambda *_: psa(threshold="0.1"), TypeError, r"threshold must be a finite number", "op thr str"),
    case(lambda *_: psa(backend=3), TypeError, r"backend must be a backend name or None", "op backend int"),
    case(
        lambda *_: psa(backend="bogus"),
        ValueError,
        r"attention backend must be one of .* got 'bogus'",
        "op backend bogus",
    ),
    case(
        lambda *_: attention(Q, K, V, "bogus"),
        ValueError,
        r"attention: backend must be one of .* 'bogus'",
        "attn bogus",
    ),
    case(lambda *_: attention(Q, K, V, "auto"), ValueError, r"attention: backend must be one of 'naive'", "attn auto"),
    case(lambda *_: select(scores=torch.rand(2, 4)), ValueError, r"select_fine_tokens: scores must be", "sel 2-D"),
    case(lambda *_: select(scores=torch.rand(1, 2, 5)), ValueError, r"scores must be \(B, h, M\)", "sel wrong M"),
    case(lambda *_: select(topk=-2), ValueError, r"select_fine_tokens: topk must be", "sel topk neg"),
    case(lambda *_: select(threshold=NAN), ValueError, r"select_fine_tokens: threshold must be", "sel thr nan"),
    case(lambda *_: select(coarse_hw=(2,)), TypeError, r"coarse_hw must be", "sel coarse_hw"),
    case(lambda *_: coarse_key_scores(None, K), TypeError, r"coarse_key_scores: q must be", "scores q None"),
    case(lambda *_: coarse_key_scores(Q, K, lse=torch.zeros(1, 2, 5)), ValueError, r"lse must be \(B, h, N\)", "lse"),
    case(lambda *_: coarse_key_scores(Q, K, max_chunk_elements=0), ValueError, r"max_chunk_elements must be", "chunk0"),
    case(lambda *_: coarse_key_scores(Q, K, max_chunk_elements=2.5), TypeError, r"max_chunk_elements", "chunk float"),
    case(lambda *_: coarse_attention_with_scores(Q, K, V, "auto"), ValueError, r"backend must be one of", "cas auto"),
    case(lambda *_: coarse_attention_with_scores(Q, K, V, None), TypeError, r"backend must be one of", "cas None"),
    case(lambda *_: coarse_attention_with_scores(Q, K, V[:, :1], "naive"), ValueError, r"v must be", "cas v heads"),
    case(
        lambda *_: set_backend("bogus"), ValueError, r"attention backend must be one of .* 'bogus'", "set_backend bogus"
    ),
    case(
        lambda *_: set_backend(123),
        TypeError,
        r"attention backend must be one of .* got 123 \(int\)",
        "set_backend int",
    ),
    case(
        lambda *_: use_backend("cudnn").__enter__(), ValueError, r"attention backend must be one of", "use_backend bad"
    ),
    case(lambda *_: set_topk(PST(48, 80, 64), -1), ValueError, r"set_topk: topk must be .* got -1", "set_topk neg"),
    case(lambda *_: set_topk(PST(48, 80, 64), "8"), TypeError, r"set_topk: topk must be .* got '8'", "set_topk str"),
    case(lambda *_: set_topk(PST(48, 80, 64), 2.5), TypeError, r"topk must be .* 2.5", "set_topk float"),
    case(lambda *_: set_topk("yolo11n-pst.pt", 8), TypeError, r"set_topk: model must be a torch.nn.Module", "set_topk"),
    case(lambda *_: PSAttn.override_topk(-1), ValueError, r"override_topk: topk must be", "override neg"),
    case(lambda *_: PSAttn.override_topk("x"), TypeError, r"override_topk: topk must be", "override str"),
]

MODULE_CASES = [
    case(lambda *_: PSAttn(0, 1), ValueError, r"PSAttn: dim must be a positive integer, got 0", "PSAttn dim 0"),
    case(lambda *_: PSAttn("64", 2), TypeError, r"PSAttn: dim must be .* '64'", "PSAttn dim str"),
    case(lambda *_: PSAttn(63, 2), ValueError, r"PSAttn: dim 63 must be a positive multiple of num_heads 2", "dim%h"),
    case(lambda *_: PSAttn(64, 0), ValueError, r"PSAttn: num_heads must be a positive integer", "PSAttn heads 0"),
    case(lambda *_: PSAttn(64, 2.0), TypeError, r"PSAttn: num_heads must be", "PSAttn heads float"),
    case(lambda *_: PSAttn(64, 2, topk=-1), ValueError, r"PSAttn: topk must be", "PSAttn topk neg"),
    case(lambda *_: PSAttn(64, 2, threshold=2), ValueError, r"PSAttn: threshold must be", "PSAttn thr 2"),
    case(lambda *_: PSAttn(64, 2, threshold=NAN), ValueError, r"PSAttn: threshold must be", "PSAttn thr nan"),
    case(lambda *_: PSAttn(64, 2, gate="yes"), TypeError, r"PSAttn: gate must be True or False", "PSAttn gate"),
    case(lambda *_: PSAttn(64, 2, shared_fine_kv=1), TypeError, r"shared_fine_kv must be True or False", "shared 1"),
    case(lambda *_: PSAttn(64, 2, fine_in_training=None), TypeError, r"fine_in_training must be", "fine_in_training"),
    case(lambda *_: PSAttn(64, 2, backend="bogus"), ValueError, r"PSAttn: backend must be one of", "PSAttn backend"),
    case(lambda *_: PSAttn(64, 2, backend=1), TypeError, r"PSAttn: backend must be one of", "PSAttn backend int"),
    case(lambda *_: attn_call(torch.randn(1, 64, 8), UPPER), ValueError, r"PSAttn.forward: x must be", "attn x 3-D"),
    case(lambda *_: attn_call(torch.randn(1, 32, 8, 8), torch.randn(1, 64, 4, 4)), ValueError, r"x must be", "x C"),
    case(lambda *_: attn_call(torch.randn(1, 64, 8, 8), torch.randn(1, 32, 4, 4)), ValueError, r"up must be", "up C"),
    case(lambda *_: attn_call(torch.randn(1, 64, 8, 8), torch.randn(2, 64, 4, 4)), ValueError, r"up must be", "up B"),
    case(lambda *_: attn_call(torch.randn(1, 64, 8, 8), torch.randn(1, 64, 3, 4)), ValueError, r"half", "up not half"),
    case(lambda *_: attn_call(torch.randn(1, 64, 8, 8), None), TypeError, r"up must be a floating-point", "up None"),
    case(lambda *_: PSAttnBlock(64, 2, mlp_ratio=0), ValueError, r"PSAttnBlock: mlp_ratio must be .* > 0", "mlp 0"),
    case(lambda *_: PSAttnBlock(64, 2, mlp_ratio="2"), TypeError, r"PSAttnBlock: mlp_ratio must be", "mlp str"),
    case(lambda *_: PSAttnBlock(64, 2, mlp_ratio=NAN), ValueError, r"mlp_ratio must be a finite", "mlp nan"),
    case(lambda *_: PSAttnBlock(64, 2, mlp_ratio=0.001), ValueError, r"MLP width int\(dim \* mlp_ratio\)", "mlp tiny"),
    case(lambda *_: PST(0, 80, 64), ValueError, r"PST: c1 must be a positive integer, got 0", "PST c1 0"),
    case(lambda *_: PST("48", 80, 64), TypeError, r"PST: c1 must be .* '48'", "PST c1 str"),
    case(lambda *_: PST(48, -80, 64), ValueError, r"PST: c_up must be a positive integer", "PST c_up neg"),
    case(lambda *_: PST(48, 80, "64"), TypeError, r"PST: c2 must be an integer", "PST c2 str"),
    case(lambda *_: PST(48, 80, 48), ValueError, r"C' = int\(c2 \* e\) = 24 must be a positive multiple of 32", "C'"),
    case(lambda *_: PST(48, 80, 64, n=0), ValueError, r"PST: n \(stacked PSA blocks\) must be a positive", "PST n 0"),
    case(lambda *_: PST(48, 80, 64, n=1.5), TypeError, r"PST: n \(stacked PSA blocks\) must be", "PST n float"),
    case(lambda *_: PST(48, 80, 64, mlp_ratio="2"), TypeError, r"PST: mlp_ratio must be .* '2'", "PST mlp str"),
    case(lambda *_: PST(48, 80, 64, mlp_ratio=-1), ValueError, r"PST: mlp_ratio must be", "PST mlp neg"),
    case(lambda *_: PST(48, 80, 64, e=0), ValueError, r"PST: e must be a finite number > 0", "PST e 0"),
    case(lambda *_: PST(48, 80, 64, e=NAN), ValueError, r"PST: e must be a finite number", "PST e nan"),
    case(lambda *_: PST(48, 80, 64, e="0.5"), TypeError, r"PST: e must be", "PST e str"),
    case(lambda *_: PST(48, 80, 64, k=-3), ValueError, r"PST: k must be a non-negative integer, got -3", "PST k neg"),
    case(lambda *_: PST(48, 80, 64, k="eight"), TypeError, r"PST: k must be .* 'eight'", "PST k str"),
    case(lambda *_: PST(48, 80, 64, k=2.5), TypeError, r"PST: k must be .* 2.5", "PST k float"),
    case(lambda *_: PST(48, 80, 64, gate="True"), TypeError, r"PSAttn: gate must be True or False", "PST gate str"),
    case(lambda *_: PST(48, 80, 64, foo=1), TypeError, r"unexpected keyword argument 'foo'", "PST unknown kwarg"),
    case(lambda *_: pst_call(FINE), TypeError, r"PST.forward expects a list \[fine_map, upper_map\]", "PST 1 map"),
    case(lambda *_: pst_call([FINE, UPPER, UPPER]), TypeError, r"expects a list", "PST 3 maps"),
    case(
        lambda *_: pst_call([UPPER, FINE]), ValueError, r"PST: the upper map \(8x8\) is larger .* swapped", "PST swap"
    ),
    case(lambda *_: pst_call([FINE[:, :32], UPPER]), ValueError, r"PST: fine map must be \(B, c1, H, W\)", "fine C"),
    case(lambda *_: pst_call([FINE, UPPER[:, :, :3]]), ValueError, r"PST: upper map must be .* half", "upper not half"),
    case(lambda *_: pst_call([FINE, torch.randn(2, 80, 4, 4)]), ValueError, r"upper map must be", "upper batch"),
    case(
        lambda *_: pst_call([FINE[0], UPPER]), ValueError, r"PST: fine map must be a floating-point tensor with 4", "3D"
    ),
    case(lambda *_: pst_call([FINE, None]), TypeError, r"PST: upper map must be a floating-point tensor", "upper None"),
]

L = r"YAML layer 4: PST"
YAML_CASES = [
    case(build("[[3, 2], 1, PST, [64]]"), ValueError, L + r" upper map .* swapped\? write 'from' as", "row swapped"),
    case(build("[2, 1, PST, [64]]"), ValueError, L + r" needs 'from' = \[fine, upper\]", "row one input"),
    case(build("[[1, 2, 3], 1, PST, [64]]"), ValueError, L + r" needs 'from' = \[fine, upper\]", "row three inputs"),
    case(build("[[2, 9], 1, PST, [64]]"), ValueError, L + r" input 9 .* is not an earlier layer", "row from too large"),
    case(build("[[2, -9], 1, PST, [64]]"), ValueError, L + r" input -9 .* not an earlier layer", "row from too small"),
    case(build("[[2, up], 1, PST, [64]]"), ValueError, L + r" input 'up'", "row from str"),
    case(build("[[2, true], 1, PST, [64]]"), ValueError, L + r" input True", "row from bool"),
    case(build("[[2, 2], 1, PST, [64]]"), ValueError, L + r" upper map \(layer 2, 16x16.*must be half", "row same map"),
    case(build("[[1, 3], 1, PST, [64]]"), ValueError, L + r" upper map \(layer 3.*must be half", "row not half"),
    case(build("[[2, 3], 0, PST, [64]]"), ValueError, L + r": n \(repeats\) must be a positive integer, got 0", "n 0"),
    case(build("[[2, 3], -1, PST, [64]]"), ValueError, L + r": n \(repeats\) must be", "row n neg"),
    case(build("[[2, 3], 1.5, PST, [64]]"), ValueError, L + r": n \(repeats\) must be .* 1.5", "row n float"),
    case(build("[[2, 3], two, PST, [64]]"), ValueError, L + r": n \(repeats\) must be .* 'two'", "row n str"),
    case(build("[[2, 3], 1, PST]"), ValueError, L + r" row must be \[\[fine, upper\], n, PST", "row no args"),
    case(build("[[2, 3], 1, PST, []]"), ValueError, L + r" args must be \[c2, mlp_ratio, e, k\]", "row args empty"),
    case(build("[[2, 3], 1, PST, 64]"), ValueError, L + r": args must be a list", "row args scalar"),
    case(build("[[2, 3], 1, PST, [64, 2, 0.5, 4, 1]]"), ValueError, L + r" args must be \[c2", "row 5 args"),
    case(build("[[2, 3], 1, PST, [two]]"), ValueError, L + r": c2 \(args\[0\]\) must be .* 'two'", "row c2 str"),
    case(build("[[2, 3], 1, PST, [-64]]"), ValueError, L + r": c2 \(args\[0\]\) must be a positive", "row c2 neg"),
    case(build("[[2, 3], 1, PST, [0]]"), ValueError, L + r": c2 \(args\[0\]\) must be a positive", "row c2 0"),
    case(build("[[2, 3], 1, PST, [48]]"), ValueError, r"YAML layer 4: PST\(.*multiple of 32", "row C' 24"),
    case(build("[[2, 3], 1, PST, [64, '2']]"), ValueError, L + r": mlp_ratio must be .* '2'", "row mlp quoted"),
    case(build("[[2, 3], 1, PST, [64, two]]"), ValueError, L + r": mlp_ratio must be .* 'two'", "row mlp str"),
    case(build("[[2, 3], 1, PST, [64, 0]]"), ValueError, L + r": mlp_ratio must be .* > 0", "row mlp 0"),
    case(build("[[2, 3], 1, PST, [64, .nan]]"), ValueError, L + r": mlp_ratio must be a finite", "row mlp nan"),
    case(build("[[2, 3], 1, PST, [64, 2, 0]]"), ValueError, L + r": e must be", "row e 0"),
    case(build("[[2, 3], 1, PST, [64, 2, half]]"), ValueError, L + r": e must be .* 'half'", "row e str"),
    case(build("[[2, 3], 1, PST, [64, 2, .inf]]"), ValueError, L + r": e must be a finite", "row e inf"),
    case(build("[[2, 3], 1, PST, [64, 2, 0.5, eight]]"), ValueError, L + r": k must be .* 'eight'", "row k str"),
    case(build("[[2, 3], 1, PST, [64, 2, 0.5, 2.5]]"), ValueError, L + r": k must be .* 2.5", "row k float"),
    case(build("[[2, 3], 1, PST, [64, 2, 0.5, -3]]"), ValueError, L + r": k must be .* -3", "row k neg"),
    case(build(PST_ROW, "yolo99m-tiny.yaml"), ValueError, r"asks for scale 'm' .*'scales' are n, s.*yolo99n", "scale"),
]


def write(tmp: Path, name: str, content: bytes | str = b"") -> str:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def image(tmp: Path) -> str:
    path = tmp / "img.png"
    import cv2

    cv2.imwrite(str(path), np.full((64, 64, 3), 127, np.uint8))
    return str(path)


def heatmap_cli(*argv):
    return lambda *_: heatmap.main(list(argv))


def bench(*argv):
    return lambda *_: bench_args(list(argv))


def sizes(*argv):
    return lambda *_: model_sizes.main(list(argv))


def cli(*argv):
    return lambda *_: cli_main(list(argv))


def demo_cli(*argv):
    return lambda *_: demo.parse_args(list(argv))


def trt_check(*argv):
    return lambda *_: tensorrt_check.main(list(argv))


def saved_pst_checkpoint(tmp: Path, model) -> str:
    path = tmp / "already.pt"
    torch.save({"model": model}, path)
    return str(path)


TOOL_CASES = [
    case(
        demo_cli("--epochs", "0"),
        SystemExit,
        r"argument --epochs: epochs must be a positive integer, got 0",
        "demo epochs 0",
    ),
    case(
        demo_cli("--imgsz", "ten"),
        SystemExit,
        r"argument --imgsz: imgsz must be an integer, got 'ten'",
        "demo imgsz str",
    ),
    case(demo_cli("--batch", "-1"), SystemExit, r"argument --batch: batch must be a positive", "demo batch neg"),
    case(
        demo_cli("--train-images", "2.5"),
        SystemExit,
        r"argument --train-images: train-images must be an integer",
        "demo float",
    ),
    case(demo_cli("--seed", "-2"), SystemExit, r"argument --seed: seed must be a non-negative integer", "demo seed"),
    case(trt_check("/nonexistent/m.onnx"), SystemExit, r"tensorrt_check: model '/nonexistent/m.onnx' does not", "trt"),
    case(trt_check(str(REPO / "README.md")), SystemExit, r"README.md' is a .md file; expected a .onnx", "trt kind"),
    case(heatmap_cli("source=a.jpg"), SystemExit, r"pst-yolo heatmap: bad arguments", "heatmap no model"),
    case(heatmap_cli("model=m.pt", "source=a.jpg", "colour=red"), SystemExit, r"bad arguments", "heatmap unknown key"),
    case(heatmap_cli("model=m.pt", "source=a", "topk=-1"), SystemExit, r"heatmap: topk must be a non-negative", "hm k"),
    case(heatmap_cli("model=m.pt", "source=a", "topk=x"), SystemExit, r"heatmap: topk must be an integer", "hm k str"),
    case(
        heatmap_cli("model=m.pt", "source=a", "imgsz=0"), SystemExit, r"heatmap: imgsz must be an integer >= 32", "sz"
    ),
    case(heatmap_cli("model=m.pt", "source=a", "layers=a,4"), SystemExit, r"heatmap: layers must be an integer", "lay"),
    case(heatmap_cli("model=m.pt", "source=a", "per_head=maybe"), SystemExit, r"per_head must be True or False", "ph"),
    case(heatmap_cli("model=m.pt", "source=a", "panel_height=0"), SystemExit, r"panel_height must be", "hm panel 0"),
    case(
        lambda tmp, m: heatmap.save_heatmaps(m, write(tmp, "data.yaml", "path: x"), tmp / "out"),
        ValueError,
        r"heatmap: source '.*data.yaml' is not an image \(.yaml\)",
        "heatmap source yaml",
    ),
    case(lambda tmp, m: heatmap.save_heatmaps(m, tmp / "nope.jpg"), FileNotFoundError, r"no image found", "hm missing"),
    case(lambda tmp, m: heatmap.save_heatmaps(m, tmp), FileNotFoundError, r"no image found at source", "hm empty dir"),
    case(
        lambda tmp, m: heatmap.save_heatmaps(m, write(tmp, "broken.jpg", b"not a jpeg"), tmp / "out"),
        ValueError,
        r"heatmap: cannot decode image '.*broken.jpg'",
        "heatmap corrupt image",
    ),
    case(
        lambda tmp, m: heatmap.attention_maps(m, image(tmp), layers=[99]),
        ValueError,
        r"layers \[99\] out of range",
        "L",
    ),
    case(
        lambda tmp, m: heatmap.attention_maps(m, image(tmp), layers=4),
        TypeError,
        r"heatmap: layers must be a list",
        "L1",
    ),
    case(lambda tmp, m: heatmap.attention_maps(m, image(tmp), topk=-1), ValueError, r"heatmap: topk must be", "hm k"),
    case(lambda tmp, m: heatmap.attention_maps(m, image(tmp), imgsz=8), ValueError, r"heatmap: imgsz must be", "hm sz"),
    case(
        lambda tmp, m: heatmap.attention_maps(m, np.zeros((64, 64, 3), np.float32)),
        TypeError,
        r"heatmap: image must be a path or a BGR uint8 array \(h, w, 3\), got float32",
        "heatmap float image",
    ),
    case(
        lambda tmp, m: heatmap.attention_maps(42, image(tmp)), TypeError, r"heatmap: model must be", "heatmap model 42"
    ),
    case(
        lambda tmp, m: heatmap.save_heatmaps(m, image(tmp), tmp / "out", per_head="yes"),
        TypeError,
        r"heatmap: per_head must be True or False",
        "heatmap per_head str",
    ),
    case(
        lambda tmp, m: convert.main([str(tmp / "missing.pt"), str(tmp / "out.pt")]),
        SystemExit,
        r"pst-yolo convert: source checkpoint '.*missing.pt' does not exist",
        "convert missing",
    ),
    case(
        lambda tmp, m: convert.main([write(tmp, "notes.pt", "just some notes"), str(tmp / "out.pt")]),
        SystemExit,
        r"pst-yolo convert: .*notes.pt is not a readable PyTorch checkpoint",
        "convert notes.pt",
    ),
    case(
        lambda tmp, m: convert.main([write(tmp, "notes.txt", "x"), str(tmp / "out.pt")]),
        SystemExit,
        r"source checkpoint '.*notes.txt' is a .txt file; expected a .pt/.pth file",
        "convert txt",
    ),
    case(lambda tmp, m: convert.main([write(tmp, "empty.pt"), str(tmp / "o.pt")]), SystemExit, r"not a readable", "0B"),
    case(
        lambda tmp, m: convert.main([saved_pst_checkpoint(tmp, m), str(tmp / "out.pt")]),
        SystemExit,
        r"has no ultralytics.nn.modules.block.PST module inside; it is already a pst-yolo checkpoint",
        "convert already converted",
    ),
    case(lambda tmp, m: convert.main(["a.pt", str(tmp / "b.onnx")]), SystemExit, r"must end in .pt", "convert dst"),
    case(lambda tmp, m: convert.main(["a.pt", "./a.pt"]), SystemExit, r"destination '.*a.pt' is the source", "dst=src"),
    case(lambda *_: convert.main(["a.pt", "b.pt", "topk=-1"]), SystemExit, r"topk must be a non-negative", "conv k"),
    case(lambda *_: convert.main(["a.pt", "b.pt", "topk=x"]), SystemExit, r"topk must be a non-negative", "conv k x"),
    case(lambda *_: convert.main(["a.pt", "b.pt", "gate=maybe"]), SystemExit, r"expected True or False", "gate"),
    case(lambda *_: convert.main(["a.pt"]), SystemExit, r"bad arguments", "convert one path"),
    case(lambda *_: convert.convert_checkpoint("a.pt", "b.pt", topk="8"), TypeError, r"convert: topk must be", "ck"),
    case(bench("--backends", "bogus"), SystemExit, r"argument --backends: invalid choice: 'bogus'", "bench backend"),
    case(bench("--model-backends", "bogus"), SystemExit, r"argument --model-backends: invalid choice", "bench mbk"),
    case(bench("--repeats", "0"), SystemExit, r"argument --repeats: repeats must be a positive integer, got 0", "rep"),
    case(bench("--repeats", "x"), SystemExit, r"argument --repeats: repeats must be an integer, got 'x'", "rep x"),
    case(bench("--warmup", "-1"), SystemExit, r"argument --warmup: warmup must be a non-negative", "bench warmup"),
    case(bench("--threads", "0"), SystemExit, r"argument --threads: threads must be a positive", "bench threads"),
    case(bench("--op-sizes", "20"), SystemExit, r"argument --op-sizes: op-sizes must be an integer >= 32", "ops"),
    case(bench("--op-sizes", "40"), SystemExit, r"op-sizes must be a multiple of 16", "bench op size 40"),
    case(bench("--topks", "0", "-8"), SystemExit, r"argument --topks: topks must be a non-negative", "bench topks"),
    case(bench("--imgsz", "650"), SystemExit, r"argument --imgsz: imgsz must be a multiple of 32", "bench imgsz"),
    case(bench("--model-topk", "-1"), SystemExit, r"argument --model-topk: model-topk must be", "bench model topk"),
    case(bench("--train-steps", "0"), SystemExit, r"argument --train-steps", "bench train steps"),
    case(bench("--train-batch", "1.5"), SystemExit, r"argument --train-batch: train-batch must be an integer", "tb"),
    case(bench("--score-batch", "0"), SystemExit, r"argument --score-batch", "bench score batch"),
    case(bench("--model-batches", "1", "0"), SystemExit, r"argument --model-batches", "bench model batches"),
    case(bench("--models", "nope"), SystemExit, r"argument --models: no model YAML for nope", "bench models"),
    case(bench("--device", "tpu"), SystemExit, r"argument --device: device must be cpu, cuda or cuda:N", "device"),
    case(bench("--clock", "sun"), SystemExit, r"argument --clock: invalid choice", "bench clock"),
    case(sizes("--configs", "nope"), SystemExit, r"pst-yolo sizes: unknown config\(s\) \['nope'\]", "sizes config"),
    case(sizes("--json-out", "/nonexistent/x.json"), SystemExit, r"--json-out: .* folder '/nonexistent'", "sizes j"),
    case(lambda tmp, m: model_sizes.main(["--markdown-out", str(tmp)]), SystemExit, r"is a folder", "sizes md dir"),
    case(cli("val", "topk=-3"), SystemExit, r"pst-yolo: topk must be a non-negative integer, got '-3'", "cli topk"),
    case(cli("val", "topk=eight"), SystemExit, r"topk must be a non-negative integer, got 'eight'", "cli topk str"),
    case(cli("val", "topk=2.5"), SystemExit, r"topk must be a non-negative integer, got '2.5'", "cli topk float"),
    case(
        cli("val", "attn_backend=bogus"),
        SystemExit,
        r"pst-yolo: attn_backend: attention backend must be one of",
        "cli b",
    ),
]

SWEEP = OP_CASES + MODULE_CASES + YAML_CASES + TOOL_CASES


@pytest.mark.parametrize("call,error,pattern", SWEEP)
def test_bad_input(call, error, pattern, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = PSAttn.topk_override
    try:
        with pytest.raises(error) as info:
            call(tmp_path, tiny_model)
    finally:
        PSAttn.override_topk(previous)
    message = str(info.value) + capsys.readouterr().err
    assert re.search(pattern, message), message


def test_sweep_size():
    """The number of bad inputs tried (reported in the issue's closing note)."""
    assert len(SWEEP) >= 201, len(SWEEP)


def test_topk_above_token_count_is_capped():
    """Too large a top-k is no error: it refines every upper token, exactly as topk = M does (documented)."""
    torch.testing.assert_close(psa(topk=10**6), psa(topk=4))


# -------------------------------------------------------------------------------- BatchNorm modes (issue point 5)
class FineAndUpper(nn.Module):
    """A PSAttn fed with (x, avg-pooled x), so that a plain loader of tensors drives it (as update_bn needs)."""

    def __init__(self):
        super().__init__()
        self.attn = PSAttn(64, 2)
        self.inputs = []  # the fine maps seen in training

    def forward(self, x):
        if self.training:
            self.inputs.append(x)
        return self.attn(x, F.avg_pool2d(x, 2, ceil_mode=True))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 64, 6, 6, generator=g) * (i + 1) + i for i in range(n)]


def conv_stats(attn, x):
    y = attn.kv.conv(x).detach()
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=1)
    return mean, var


def test_update_bn_cumulative_average():
    """torch.optim.swa_utils.update_bn (momentum=None): fine statistics are the plain average over the loader."""
    model = FineAndUpper()
    model.attn.fine_kv_mean.fill_(100.0)  # stale statistics must not survive the recalibration
    loader = batches()
    torch.optim.swa_utils.update_bn(loader, model)
    stats = [conv_stats(model.attn, x) for x in model.inputs]
    torch.testing.assert_close(model.attn.fine_kv_mean, torch.stack([m for m, _ in stats]).mean(0))
    torch.testing.assert_close(model.attn.fine_kv_var, torch.stack([v for _, v in stats]).mean(0))
    assert model.attn.kv.bn.momentum == 0.1  # update_bn restored it


def test_reset_running_stats_restarts_fine_statistics():
    model = FineAndUpper().train()
    model.attn.fine_kv_mean.fill_(100.0)
    model.attn.kv.bn.num_batches_tracked.fill_(50)
    model.attn.kv.bn.reset_running_stats()  # as nn.BatchNorm2d: back to mean 0 / var 1, then momentum 0.1
    model(batches(1)[0])
    mean, var = conv_stats(model.attn, model.inputs[0])
    torch.testing.assert_close(model.attn.fine_kv_mean, 0.1 * mean)
    torch.testing.assert_close(model.attn.fine_kv_var, 0.9 + 0.1 * var)


def test_bn_without_running_stats_uses_batch_statistics():
    model = FineAndUpper().train()
    model.attn.kv.bn = nn.BatchNorm2d(128, track_running_stats=False)
    before = model.attn.fine_kv_mean.clone()
    model(batches(1)[0])  # no crash, nothing tracked
    assert torch.equal(model.attn.fine_kv_mean, before)
    model.eval()
    x = batches(1, seed=1)[0]
    bn = model.attn.kv.bn
    expected = F.batch_norm(model.attn.kv.conv(x), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    torch.testing.assert_close(model.attn.fine_keys_values(x), expected)


def test_frozen_bn_leaves_fine_statistics_alone():
    model = FineAndUpper().train()
    model.attn.kv.bn.eval()  # a frozen BN (fine-tuning with frozen norms) updates nothing, so neither do we
    before = model.attn.fine_kv_mean.clone()
    model(batches(1)[0])
    assert torch.equal(model.attn.fine_kv_mean, before)


# ----------------------------------------------------------------------------- non-finite inputs (issue point 6)
def test_nan_query_drops_only_its_own_row():
    """A NaN query row adds nothing to the eq. 3 scores: the other queries keep their fine branch."""
    q = Q.clone()
    q[0, 0, 5] = NAN
    scores = coarse_key_scores(q, K)
    assert torch.isfinite(scores).all()
    others = torch.cat((Q[:, :, :5], Q[:, :, 6:]), dim=2)
    torch.testing.assert_close(scores[:, 0], coarse_key_scores(others, K)[:, 0] * 15 / 16)
    out, coarse = psa(q=q), psa(q=q, topk=0)
    assert torch.isnan(out[0, 0, 5]).all(), "the NaN query's own output stays NaN (visible, not hidden)"
    keep = torch.ones(16, dtype=torch.bool)
    keep[5] = False
    assert torch.isfinite(out[0, 0, keep]).all()
    assert (out[0, 0, keep] - coarse[0, 0, keep]).abs().max() > 1e-3, "the fine branch still acts on the others"


def test_debug_mode_rejects_non_finite_inputs(monkeypatch):
    monkeypatch.setattr(pst_yolo.validation, "CHECK_FINITE", True)
    k = K.clone()
    k[0, 1, 2, 3] = INF
    with pytest.raises(ValueError, match=r"pyramid_sparse_attention: k holds 1 non-finite value"):
        psa(k=k)


# ---------------------------------------------------------------------------------------------- CLI and loading
def test_topk_on_a_stock_model_warns(tmp_path):
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    from pst_yolo.cli import warn_if_no_psa

    stock, ours = tmp_path / "stock.pt", tmp_path / "pst.pt"
    YOLO("yolo11n.yaml").save(stock)
    torch.save({"model": DetectionModel(tiny_yaml(tmp_path), verbose=False)}, ours)
    records, level = [], LOGGER.level
    handler = type("Keep", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.WARNING)  # the tests run with YOLO_VERBOSE=false
    try:
        for model in (stock, ours, "yolo11n.yaml", "yolo11n-pst.yaml"):
            warn_if_no_psa([f"model={model}"], "8")
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    assert [m for m in records if "topk=8 has no effect" in m] == [
        f"pst-yolo: topk=8 has no effect: {stock} has no PSA module (it is not a PST model).",
        "pst-yolo: topk=8 has no effect: yolo11n.yaml has no PSA module (it is not a PST model).",
    ]


def test_safe_load_without_plugin_says_import_pst_yolo(tmp_path):
    """PST_YOLO_DISABLE_HOOK=1 + ULTRALYTICS_SAFE_LOAD=1: the refusal names the fix (the repo's hook is loaded)."""
    path = tmp_path / "model.pt"
    torch.save({"model": DetectionModel(tiny_yaml(tmp_path), verbose=False), "train_args": {}}, path)
    code = f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_pst_yolo_hook", {str(REPO / "_pst_yolo_hook.py")!r})
        hook = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hook)
        sys.modules["_pst_yolo_hook"] = hook
        hook.install()
        from ultralytics import YOLO
        YOLO({str(path)!r})
    """
    env = {**os.environ, "PST_YOLO_DISABLE_HOOK": "1", "ULTRALYTICS_SAFE_LOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "holds pst_yolo modules" in result.stderr and "run `import pst_yolo` before loading it" in result.stderr
