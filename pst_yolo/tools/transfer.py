"""Head start from stock weights: which tensors of a stock checkpoint a PST model takes over.

Ultralytics' ``YOLO("yolo11n-pst.yaml").load("yolo12n.pt")`` (``BaseModel.load``) copies every state-dict item whose
name and shape match (``ultralytics.utils.torch_utils.intersect_dicts``). Every PST config keeps the layer indices,
modules and arguments of the stock model it extends (``pst_yolo.configs.STOCK_COUNTERPARTS``) outside its PST rows,
so those rows' tensors all transfer; :func:`transfer_report` counts what does, split by PST / non-PST rows.

Examples:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> report = transfer_report(DetectionModel("yolo11n-pst.yaml", verbose=False),
    ...                          DetectionModel("yolo12n.yaml", verbose=False))
    >>> report.outside_pst_missing
    []
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from ultralytics.utils.torch_utils import intersect_dicts

from ..nn import PST


@dataclass
class TransferReport:
    """What ``pst_model.load(stock_model)`` transfers (state-dict items, BN statistics included, as Ultralytics counts).

    Attributes:
        transferred: Items copied from the stock model (Ultralytics' "Transferred N/M items").
        total: Items of the PST model.
        outside_pst: Items of the PST model outside its PST rows.
        outside_pst_missing: Names of those that do not transfer (empty for every config whose widths match stock).
        pst_rows: Indices of the PST rows.
        pst_matched: Items inside PST rows that match a stock item's name and shape by coincidence (e.g. the stock
            block's ``cv1``/``cv2`` projections), which Ultralytics copies too.
    """

    transferred: int
    total: int
    outside_pst: int
    outside_pst_missing: list[str] = field(default_factory=list)
    pst_rows: list[int] = field(default_factory=list)
    pst_matched: int = 0

    def summary(self) -> str:
        """One line for tables: ``607/699 (583/583 non-PST + 24 in PST rows)``."""
        kept = self.outside_pst - len(self.outside_pst_missing)
        return f"{self.transferred}/{self.total} ({kept}/{self.outside_pst} non-PST + {self.pst_matched} in PST rows)"


def pst_rows(model: torch.nn.Module) -> list[int]:
    """Layer indices of the PST rows of an Ultralytics model (``model.model`` is its layer Sequential)."""
    return sorted(m.i for m in model.model if isinstance(m, PST))


def layer_index(name: str) -> int:
    """Layer index of an Ultralytics state-dict key: ``model.11.cv1.conv.weight`` -> 11."""
    return int(name.split(".")[1])


def transfer_report(pst_model: torch.nn.Module, stock_model: torch.nn.Module) -> TransferReport:
    """Count what Ultralytics' ``pst_model.load(stock_model)`` copies (same ``nc``: name-and-shape matches).

    Args:
        pst_model: The PST model (an Ultralytics ``BaseModel`` with PST rows).
        stock_model: The stock model it extends.
    """
    rows = pst_rows(pst_model)
    ours = pst_model.state_dict()
    matched = intersect_dicts(stock_model.float().state_dict(), ours)
    outside = [k for k in ours if layer_index(k) not in rows]
    return TransferReport(
        transferred=len(matched),
        total=len(ours),
        outside_pst=len(outside),
        outside_pst_missing=[k for k in outside if k not in matched],
        pst_rows=rows,
        pst_matched=sum(layer_index(k) in rows for k in matched),
    )
