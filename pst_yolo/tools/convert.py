"""Convert checkpoints trained with the authors' Ultralytics fork (inlmouse/PyramidSparseTransformer) to pst-yolo.

    pst-yolo convert SRC.pt DST.pt [topk=8] [gate=False]

The authors' checkpoints pickle ``ultralytics.nn.modules.block.PST`` / ``PSAttnBlock`` / ``PSAttn``, classes that stock
Ultralytics does not have. They are unpickled as plain stand-in modules (only their weights are read), the network is
rebuilt with pst-yolo's modules from the model YAML stored in the checkpoint, and every weight is moved across:

- ``attnlayer_i`` -> ``blocks.i``;
- ``kv`` output channels go from the authors' per-head interleaving (head h: K at [64h, 64h+32), V at
  [64h+32, 64h+64)) to pst-yolo's [K of all heads | V of all heads];
- ``gate_conv1d`` (always present in their modules, never trained when training with k=0) is dropped, or kept as
  pst-yolo's eq. 7-8 gate with ``gate=True``;
- the fine-map K/V statistics start as the upper-map ones, which is what the authors' code applies to fine tokens.

With k=0 the converted model computes the authors' function exactly. With k>0 it differs by design: the authors rank
upper tokens by the mean of pre-softmax logits plus Gumbel noise (random at inference) and always fuse through the gate,
pst-yolo ranks by the paper's eq. 3 probabilities, deterministically, and sums the branches (paper Table 4c).
The output is a stock Ultralytics checkpoint (``model`` + metadata) that ``yolo predict model=DST.pt`` loads.
"""

from __future__ import annotations

import copy
import pickle
import re
import sys
import types
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from ..nn import PSAttn
from ..validation import check_bool, check_file, check_int

AUTHORS_MODULE = "ultralytics.nn.modules.block"
AUTHORS_BLOCK_KEY = re.compile(r"^(model\.\d+)\.attnlayer_(\d+)\.")
KV_KEY = re.compile(r"\.attn\.kv\.(conv\.weight|bn\.weight|bn\.bias|bn\.running_mean|bn\.running_var)$")
GATE_KEY = re.compile(r"\.attn\.gate_conv1d\.(weight|bias)$")
HEAD_DIM = 32
KEPT_METADATA = ("epoch", "best_fitness", "train_args", "train_metrics", "train_results")
USAGE = __doc__.split("\n\n")[1]


class AuthorsPST(nn.Module):
    """Unpickling stand-in for the authors' ``PST`` (cv1, cvup, cv2, attnlayer_0..n-1); weights only, no forward."""


class AuthorsPSAttnBlock(nn.Module):
    """Unpickling stand-in for the authors' ``PSAttnBlock`` (attn, mlp)."""


class AuthorsPSAttn(nn.Module):
    """Unpickling stand-in for the authors' ``PSAttn`` (q, kv, proj, pe, gate_conv1d)."""


STAND_INS = {"PST": AuthorsPST, "PSAttnBlock": AuthorsPSAttnBlock, "PSAttn": AuthorsPSAttn}


class AuthorsUnpickler(pickle.Unpickler):
    """Unpickler that resolves the authors' three PST classes to stand-ins and everything else as usual."""

    def find_class(self, module: str, name: str):
        if module == AUTHORS_MODULE and name in STAND_INS:
            return STAND_INS[name]
        return super().find_class(module, name)


AUTHORS_PICKLE = types.ModuleType("pst_yolo_authors_pickle")  # a pickle_module for torch.load
AUTHORS_PICKLE.Unpickler = AuthorsUnpickler
AUTHORS_PICKLE.load = lambda file, **kwargs: AuthorsUnpickler(file, **kwargs).load()


def load_authors_checkpoint(path: str | Path) -> tuple[dict, nn.Module]:
    """Load an authors'-fork checkpoint; returns the checkpoint dict and its model (EMA if present)."""
    check_file(path, "source checkpoint", "convert", suffixes=(".pt", ".pth"))
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=AUTHORS_PICKLE, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, ModuleNotFoundError) as e:
        raise ValueError(
            f"convert: {path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); give the .pt file saved "
            "by the authors' fork (e.g. runs/detect/train/weights/best.pt)."
        ) from e
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert: {path} is not an Ultralytics checkpoint (no 'ema' or 'model' module).")
    if not any(isinstance(m, AuthorsPST) for m in model.modules()):
        already = any(type(m).__module__.startswith("pst_yolo.") for m in model.modules())
        reason = "it is already a pst-yolo checkpoint" if already else "nothing to convert"
        raise ValueError(f"convert: {path} has no {AUTHORS_MODULE}.PST module inside; {reason}.")
    return ckpt, model


def converted_yaml(yaml: dict, topk: int) -> dict:
    """The authors' model YAML with each PST row's args as pst-yolo's [c2, mlp_ratio, e, k]."""
    yaml = copy.deepcopy(yaml)
    for row in yaml["backbone"] + yaml["head"]:
        if row[2] == "PST":
            args = row[3]
            row[3] = [args[0], args[1] if len(args) > 1 else 2.0, args[2] if len(args) > 2 else 0.5, topk]
    return yaml


def build_model(yaml: dict) -> nn.Module:
    """Build pst-yolo's model for a (converted) YAML: ClassificationModel for a Classify head, else DetectionModel."""
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    head = yaml["head"][-1][2]
    model_class = ClassificationModel if head == "Classify" else DetectionModel
    return model_class(copy.deepcopy(yaml), ch=yaml.get("channels", 3), nc=yaml.get("nc"), verbose=False)


def kv_channel_order(channels: int) -> torch.Tensor:
    """Indices into the authors' kv channels, in pst-yolo's order: (2C',) with heads = C' / 32.

    pst-yolo channel p * C' + 32 h + t (p = 0 for K, 1 for V) is the authors' channel 64 h + 32 p + t.
    """
    heads = channels // (2 * HEAD_DIM)
    return torch.arange(channels).view(heads, 2, HEAD_DIM).transpose(0, 1).reshape(-1)


def convert_state_dict(source: dict[str, torch.Tensor], keep_gate: bool) -> dict[str, torch.Tensor]:
    """Rename and re-order the authors' state dict into pst-yolo's keys and layouts (fine statistics added)."""
    state = {}
    for key, value in source.items():
        key = AUTHORS_BLOCK_KEY.sub(r"\1.blocks.\2.", key)
        if GATE_KEY.search(key):
            if keep_gate:  # Conv1d(64, 32, 1) weight (32, 64, 1) -> Linear(64, 32) weight (32, 64)
                state[key.replace(".gate_conv1d.", ".gate.")] = value.squeeze(-1) if value.dim() == 3 else value
            continue
        if KV_KEY.search(key):
            value = value[kv_channel_order(value.shape[0])]
            if key.endswith(("bn.running_mean", "bn.running_var")):
                fine_key = key.replace(".kv.bn.running_", ".fine_kv_")  # fine statistics = upper ones, as theirs
                state[fine_key] = value.clone()
        state[key] = value
    return state


def add_authors_gates(model: nn.Module) -> None:
    """Give every PSA module of ``model`` an eq. 7-8 gate shaped like the authors' gate_conv1d, to be loaded."""
    for m in model.modules():
        if isinstance(m, PSAttn):
            m.gate = nn.Linear(2 * m.head_dim, m.head_dim)


def convert_model(source_model: nn.Module, topk: int = 8, keep_gate: bool = False) -> nn.Module:
    """pst-yolo model with the weights of an authors' model (unpickled with :func:`load_authors_checkpoint`)."""
    model = build_model(converted_yaml(source_model.yaml, topk))
    if keep_gate:
        add_authors_gates(model)
    state = convert_state_dict(source_model.float().state_dict(), keep_gate)
    own = model.state_dict()
    for key in own.keys() - state.keys():
        if key.endswith(("fine_kv_scale", "fine_kv_shift")):  # derived at fuse() time
            state[key] = own[key]
    model.load_state_dict(state, strict=True)
    for name in ("names", "args", "task"):
        if hasattr(source_model, name):
            setattr(model, name, getattr(source_model, name))
    return model.eval()


def convert_checkpoint(src: str | Path, dst: str | Path, topk: int = 8, keep_gate: bool = False) -> Path:
    """Convert an authors'-fork checkpoint file to a pst-yolo checkpoint in Ultralytics' format.

    The model keeps the source's precision (the fork saves fp16); training state (optimizer, EMA) is dropped.
    """
    from ultralytics import __version__

    topk, keep_gate = check_int(topk, "topk", "convert", minimum=0), check_bool(keep_gate, "keep_gate", "convert")
    if Path(dst).suffix != ".pt":
        raise ValueError(f"convert: the destination {str(dst)!r} must end in .pt (Ultralytics loads .pt checkpoints).")
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"convert: the destination {str(dst)!r} is the source; write the converted model elsewhere.")
    ckpt, source_model = load_authors_checkpoint(src)
    dtype = next(source_model.parameters()).dtype
    model = convert_model(source_model, topk, keep_gate).to(dtype)
    kept = {k: v for k, v in ckpt.items() if k in KEPT_METADATA}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            **kept,
            "model": model,
            "ema": None,
            "optimizer": None,
            "date": datetime.now().astimezone().isoformat(),
            "version": __version__,
            "license": "AGPL-3.0 License (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com",
            "pst_yolo": {"converted_from": str(src), "topk": topk, "gate": keep_gate},
        },
        dst,
    )
    return dst


def parse_bool(value: str) -> bool:
    """'True'/'False' (any case, or 1/0) -> bool."""
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise SystemExit(f"pst-yolo convert: expected True or False, got '{value}'.")


def main(argv: list[str] | None = None) -> None:
    """``pst-yolo convert SRC.pt DST.pt [topk=K] [gate=True]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    paths = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = options.keys() - {"topk", "gate"}
    if len(paths) != 2 or unknown:
        raise SystemExit(f"pst-yolo convert: bad arguments {args}.\n{USAGE}")
    topk = options.get("topk", "8")
    if not topk.isdigit():
        raise SystemExit(f"pst-yolo convert: topk must be a non-negative integer, got '{topk}'.")
    topk = int(topk)
    try:
        dst = convert_checkpoint(paths[0], paths[1], topk, parse_bool(options.get("gate", "False")))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pst-yolo {e}") from e
    print(f"pst-yolo convert: wrote {dst} (topk={topk}); check it with: yolo predict model={dst} source=IMAGE")


if __name__ == "__main__":
    main()
