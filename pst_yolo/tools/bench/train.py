"""The training section of ``pst-yolo bench``: an Ultralytics detection training iteration (forward, loss, backward,
optimizer step) per model on a random batch, and forward + backward of the PST rows' parts alone (the layers, their
Conv modules, their conv kernels, the attention kernel) with the throughput of the kernels beside a dense GEMM's."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_leaves

from .models import is_pst
from .timing import gemm_call, time_round_robin


def random_detection_batch(batch: int, imgsz: int, device, boxes_per_image: int = 4) -> dict:
    """Random images and boxes in the layout Ultralytics' dataloader yields: ``img`` (batch, 3, imgsz, imgsz) uint8,
    and per box (n = batch * boxes_per_image) ``batch_idx`` (n,), ``cls`` (n, 1) and ``bboxes`` (n, 4), normalised
    xywh."""
    g = torch.Generator().manual_seed(0)
    n = batch * boxes_per_image
    centers, sizes = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return {
        "img": torch.randint(0, 256, (batch, 3, imgsz, imgsz), generator=g, dtype=torch.uint8).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image).float().to(device),
        "cls": torch.randint(0, 80, (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat((centers, sizes), dim=1).to(device),
    }


def training_iteration(name: str, batch: dict, device, accumulate: int) -> tuple[torch.nn.Module, Callable, Callable]:
    """An untrained ``name`` model and the two parts of an Ultralytics 8.4 detection training iteration of it.

    ``forward_backward`` runs every iteration, as ``BaseTrainer._do_train`` does: the batch as
    ``DetectionTrainer.preprocess_batch`` leaves it (uint8 images / 255), ``model(batch)`` (forward and
    ``v8DetectionLoss``) under autocast (AMP on CUDA only, as ``check_amp`` decides), ``loss.sum()`` backward through
    the gradient scaler. ``optimizer_step`` runs once per ``accumulate`` iterations, as ``BaseTrainer.optimizer_step``:
    unscale, gradient clipping at norm 10, SGD (the paper's recipe, nesterov, weight decay on conv/linear weights only:
    ``BaseTrainer.build_optimizer``'s groups), ``zero_grad`` and the EMA update.
    """
    from types import SimpleNamespace

    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA

    import pst_yolo  # noqa: F401

    cfg = get_cfg()
    model = DetectionModel(f"{name}.yaml", verbose=False).to(device).train()
    model.args = cfg  # loss gains (box, cls, dfl), as the trainer attaches them
    decay = cfg.weight_decay * len(batch["img"]) * accumulate / cfg.nbs  # scaled as the trainer scales it
    trainer = SimpleNamespace(args=cfg)  # build_optimizer reads its trainer only for optimizer=auto
    optimizer = BaseTrainer.build_optimizer(trainer, model, "SGD", cfg.lr0, cfg.momentum, decay)
    ema, amp = ModelEMA(model), device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def forward_backward():
        images = {**batch, "img": batch["img"].float() / 255}
        with torch.autocast(device.type, enabled=amp):
            loss, _ = model(images)
        scaler.scale(loss.sum()).backward()

    def optimizer_step():
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        ema.update(model)

    return model, forward_backward, optimizer_step


def forward_recording(model: torch.nn.Module, images: torch.Tensor, hooks: list) -> None:
    """One forward of ``images`` without autograd for the ``hooks`` (handles of hooks that record what the modules
    see) to record, which are removed afterwards."""
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()


def psa_attention_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(B, heads, N, M, head dim) of the coarse attention of each PSA layer in one forward of ``images``."""
    from ...nn import PSAttn

    shapes = []

    def record(module, inputs):
        x, up = inputs  # (B, C, H, W), (B, C, Hu, Wu)
        shapes.append((len(x), module.num_heads, x.shape[2] * x.shape[3], up.shape[2] * up.shape[3], module.head_dim))

    attention_modules = [m for m in model.modules() if isinstance(m, PSAttn)]
    forward_recording(model, images, [m.register_forward_pre_hook(record) for m in attention_modules])
    return shapes


def attention_forward_backward(shapes: list[tuple[int, int, int, int, int]], device) -> Callable[[], None]:
    """Forward and backward of the attention kernel a PSA layer trains with (the default backend, in AMP's float16 on
    CUDA as training runs it) at each of ``shapes`` (from :func:`psa_attention_shapes`), on seeded random tensors."""
    from ...ops import attention, resolve_backend

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    tensors = []
    for b, h, n, m, d in shapes:
        q, k, v, grad = (torch.randn(b, h, rows, d, generator=g).to(device, dtype) for rows in (n, m, m, n))
        tensors.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad))

    def run():
        for q, k, v, grad in tensors:
            out, _ = attention(q, k, v, resolve_backend(None, q, kv_len=k.shape[2]))
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    return run


def layers_forward_backward(
    model: torch.nn.Module, images: torch.Tensor, indices: list[int], part_type: type | None = None
) -> Callable[[], None]:
    """Forward and backward of the layers ``model.model[i]`` alone, i in ``indices`` (with ``part_type``: of every
    module of that type inside them instead), on the inputs one training forward of ``images`` gives them (in the
    memory format they train with), with seeded random output gradients; parameter gradients accumulate as in
    training."""
    modules = [model.model[i] for i in indices]
    if part_type is not None:
        modules = [m for layer in modules for m in layer.modules() if isinstance(m, part_type)]
    inputs = {}

    def record(module, args):
        inputs.setdefault(module, args[0])

    forward_recording(model, images, [m.register_forward_pre_hook(record) for m in modules])
    g = torch.Generator().manual_seed(0)
    calls = []
    for m in modules:
        x = [t.detach().clone().requires_grad_() for t in tree_leaves(inputs[m])]  # clone keeps the memory format
        arg = x if isinstance(inputs[m], (list, tuple)) else x[0]  # PST takes [fine, upper]
        out = m(arg)
        calls.append((m, arg, x, torch.randn(out.shape, generator=g).to(out)))

    def run():
        for m, arg, x, grad in calls:
            m(arg).backward(grad)
            for t in x:
                t.grad = None

    return run


def conv_training_flops(model: torch.nn.Module, images: torch.Tensor, indices: list[int]) -> int:
    """FLOPs of the forward and backward of every ``nn.Conv2d`` inside the layers ``model.model[i]``, i in
    ``indices``, in one training step on ``images``: per conv 2 MACs forward, 2 for the input gradient and 2 for the
    weight gradient, with MACs = output elements * input channels per group * kernel area."""
    convs = [m for i in indices for m in model.model[i].modules() if isinstance(m, torch.nn.Conv2d)]
    flops = []

    def record(module, inputs, output):
        kernel_area = module.kernel_size[0] * module.kernel_size[1]
        flops.append(6 * output.numel() * module.in_channels // module.groups * kernel_area)

    forward_recording(model, images, [m.register_forward_hook(record) for m in convs])
    return sum(flops)


def attention_training_flops(shapes: list[tuple[int, int, int, int, int]]) -> int:
    """FLOPs of the attention matmuls in one training step at ``shapes`` (B, heads, N, M, head dim), from
    :func:`psa_attention_shapes`: q k^T and p v forward (4 B h N M d), and the four products of their backward (dV,
    dP, dQ, dK: 8 B h N M d). A fused kernel that recomputes q k^T in its backward does more than this."""
    return sum(12 * b * h * n * m * d for b, h, n, m, d in shapes)


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (None where the OS does not report them)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def counting_page_faults(fn: Callable[[], object], counts: list[int]) -> Callable[[], None]:
    """``fn`` that appends the minor page faults of each call to ``counts``."""

    def run():
        before = minor_page_faults()
        fn()
        if before is not None:
            counts.append(minor_page_faults() - before)

    return run


def bench_train(args, device) -> list[dict]:
    """ms per training iteration of YOLO12n and YOLO11n-PST (those of ``args.models``; both when it has neither) on a
    random batch of ``args.train_batch`` images at ``args.train_imgsz`` (:func:`random_detection_batch`): forward +
    loss + backward, plus 1/accumulate of an optimizer step (with the trainer's accumulate = round(nbs / batch),
    nbs = 64), each part timed round-robin across the models for ``args.train_steps`` rounds after one untimed.

    Also timed in the same rounds, forward and backward of parts alone, at the shapes and inputs of the training
    forward: each model's layers at the PST model's PST rows (``replaced_layers_ms``: A2C2f blocks in YOLO12n, PST
    in the PST model), the Ultralytics ``Conv`` modules inside its PST layers (``convs_ms``) and the attention kernel at
    its PSA layers' shapes (``attention_ms``). How fast PST's kernels run: the ``nn.Conv2d`` kernels alone inside its
    PST layers (``conv_kernels_ms``) and the attention kernel, each as GFLOP/s (:func:`conv_training_flops`,
    :func:`attention_training_flops`), beside a dense GEMM's timed in the same rounds (``gemm_gflops``; 1024^2 on
    CPU). ``page_faults``: median minor page faults per forward+backward (the CPU allocator returning memory to the OS
    and faulting it back in; it moves from run to run).

    Returns the rows, one per model, of medians over the rounds.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.modules import Conv

    from ...nn import PST

    names = [n for n in ("yolo12n", "yolo11n-pst") if n in args.models] or ["yolo12n", "yolo11n-pst"]
    batch_size = args.train_batch
    accumulate = max(round(get_cfg().nbs / batch_size), 1)
    batch = random_detection_batch(batch_size, args.train_imgsz, device)
    images = batch["img"].float() / 255
    calls, models, faults = {}, {}, {n: [] for n in names}
    for name in names:
        models[name], forward_backward, calls[f"{name} optimizer"] = training_iteration(name, batch, device, accumulate)
        calls[f"{name} forward+backward"] = counting_page_faults(forward_backward, faults[name])
    pst_rows = next(([m.i for m in models[n].model if isinstance(m, PST)] for n in names if is_pst(models[n])), [])
    flops = {}  # call name -> FLOPs of one call, for the calls whose throughput is reported
    for name, model in models.items():
        if pst_rows:
            calls[f"{name} layers"] = layers_forward_backward(model, images, pst_rows)
        if is_pst(model):
            shapes = psa_attention_shapes(model, images)
            calls[f"{name} convs"] = layers_forward_backward(model, images, pst_rows, Conv)
            calls[f"{name} conv kernels"] = layers_forward_backward(model, images, pst_rows, torch.nn.Conv2d)
            calls[f"{name} attention"] = attention_forward_backward(shapes, device)
            flops[f"{name} conv kernels"] = conv_training_flops(model, images, pst_rows)
            flops[f"{name} attention"] = attention_training_flops(shapes)
    if flops:
        gemm_shape = (1024, torch.float32) if device.type == "cpu" else (4096, torch.float16)  # fp16: as AMP trains
        calls["gemm"], flops["gemm"] = gemm_call(device, *gemm_shape)
    ms = time_round_robin(calls, args.train_steps, 1, device, args.clock)
    gflops = {call: count / ms[call] / 1e6 for call, count in flops.items()}
    rows = []
    for n in names:
        fb, opt = ms[f"{n} forward+backward"], ms[f"{n} optimizer"]
        iteration = fb + opt / accumulate
        rows.append(
            {"model": n, "batch": batch_size, "imgsz": args.train_imgsz, "accumulate": accumulate, "ms": iteration,
             "forward_backward_ms": fb, "optimizer_ms": opt, "images_per_s": 1e3 * batch_size / iteration,
             "page_faults": statistics.median(faults[n]) if faults[n] else None,
             "replaced_layers": ", ".join(map(str, pst_rows)), "replaced_layers_ms": ms.get(f"{n} layers"),
             "convs_ms": ms.get(f"{n} convs"), "conv_kernels_ms": ms.get(f"{n} conv kernels"),
             "attention_ms": ms.get(f"{n} attention"), "conv_gflops": gflops.get(f"{n} conv kernels"),
             "attention_gflops": gflops.get(f"{n} attention"),
             "gemm_gflops": gflops["gemm"] if f"{n} attention" in gflops else None}
        )  # fmt: skip
    print("train iteration: " + ", ".join(f"{r['model']}: {r['ms']:.0f} ms" for r in rows))
    return rows
