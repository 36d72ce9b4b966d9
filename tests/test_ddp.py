"""Real DDP on the CPU: 2 processes (torch.distributed, gloo) train YOLOv11-PST-N with Ultralytics' own loss.

The model is wrapped as Ultralytics 8.4's trainer wraps it (``BaseTrainer._setup_train``): ``find_unused_parameters
= not compile``, ``static_graph = compile``, buffer sync off (``forward_sync_buffers=False`` from torch 2.13, else
``broadcast_buffers=False``), the loss from ``model(batch)`` (``DetectionModel.loss`` -> ``v8DetectionLoss``) summed
and multiplied by the world size. Only ``device_ids`` differs: the trainer passes the CUDA index, on the CPU it
must be None. Each rank starts from different random weights (DDP broadcasts rank 0's) and trains on different
images; after a few SGD steps every parameter must be identical across ranks, once as shipped and once with the
``gate=True`` ablation, whose gates get no gradient in coarse-only training.
"""

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two training processes: the full suite, not the fast tier

WORLD_SIZE, STEPS, IMGSZ, BATCH = 2, 3, 64, 2


def rank_batch(rank: int, nc: int) -> dict:
    """Random images and boxes for one rank (as a DistributedSampler would give each rank its own images)."""
    g = torch.Generator().manual_seed(100 + rank)
    n = BATCH * 3
    return {
        "img": torch.rand(BATCH, 3, IMGSZ, IMGSZ, generator=g),
        "batch_idx": torch.arange(BATCH).repeat_interleave(3).float(),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float(),
        "bboxes": torch.cat((torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.1), 1),
    }


def wrap_like_ultralytics(model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
    """DistributedDataParallel with the arguments of Ultralytics 8.4's BaseTrainer._setup_train (CPU: no device_ids)."""
    from ultralytics.utils.torch_utils import TORCH_1_11, TORCH_2_13

    ddp_kwargs = {"static_graph": bool(compile)} if TORCH_1_11 else {}
    ddp_kwargs["forward_sync_buffers" if TORCH_2_13 else "broadcast_buffers"] = False
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=None, find_unused_parameters=not bool(compile), **ddp_kwargs
    )


def train_one(rank: int, gate: bool) -> dict:
    """Build, wrap and train one model on this rank; compare its parameters with the other ranks'."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from pst_yolo.tools.convert import add_authors_gates

    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = DetectionModel("yolo11n-pst.yaml", nc=2, verbose=False)
    if gate:
        add_authors_gates(model)  # eq. 7-8 gates, used only when the fine branch runs (never in training here)
    model.args = get_cfg()  # loss gains, as the trainer attaches them
    ddp = wrap_like_ultralytics(model.train())
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch, losses = rank_batch(rank, nc=2), []
    for _ in range(STEPS):
        loss, _ = ddp(batch)
        loss = loss.sum() * WORLD_SIZE  # as BaseTrainer does under DDP
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    no_grad = sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(everyone, flat)
    bn_means = torch.cat([b.flatten() for name, b in model.named_buffers() if name.endswith("running_mean")])
    all_means = [torch.empty_like(bn_means) for _ in range(WORLD_SIZE)]
    dist.all_gather(all_means, bn_means)
    return {
        "identical": all(torch.equal(flat, other) for other in everyone),
        "changed": sum(not torch.equal(start[n], p) for n, p in model.named_parameters()),
        "parameters": len(start),
        "unused": no_grad,
        "unused_unchanged": all(torch.equal(start[n], dict(model.named_parameters())[n]) for n in no_grad),
        "bn_stats_differ": not torch.equal(all_means[0], all_means[1]),
        "losses": losses,
    }


def worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for gate in (False, True):
            start = time.perf_counter()
            results["gate" if gate else "shipped"] = {**train_one(rank, gate), "seconds": time.perf_counter() - start}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_keep_parameters_identical(tmp_path):
    out = tmp_path / "ddp.json"
    start = time.perf_counter()
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    results = json.loads(out.read_text())
    print(f"\nDDP 2x gloo, {time.perf_counter() - start:.1f} s in all: {json.dumps(results)}")
    shipped, gated = results["shipped"], results["gate"]
    for run in (shipped, gated):
        assert run["identical"], "parameters differ across ranks after DDP steps"
        assert run["changed"] > 0.9 * run["parameters"], "training must move (almost) every parameter"
        assert run["bn_stats_differ"], "buffer sync is off: each rank keeps its own BatchNorm statistics"
        assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert gated["unused"] and all(".gate." in name for name in gated["unused"]), gated["unused"]
    assert gated["unused_unchanged"]
    assert not shipped["unused"] or all(".gate." in n for n in shipped["unused"]), shipped["unused"]
