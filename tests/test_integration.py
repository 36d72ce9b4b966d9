"""Ultralytics integration: YAML parsing of PST rows, errors, start-up hook, safe loading, DDP state, CLI keys."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

import pst_yolo
from pst_yolo.cli import split_plugin_args
from pst_yolo.configs import find_model_config, model_configs

ENV = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false"}


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (the start-up hook, not this process's imports, must register PST)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**ENV, **env}, capture_output=True, text=True, timeout=300
    )


def pst_layers(model):
    return {m.i: m for m in model.model if isinstance(m, pst_yolo.PST)}


def test_channel_inference_yolo11n_pst():
    """Layer 11: fine = cat(up(P5), P4) = 256 + 128, upper = P5 (256); layer 14: fine = 128 + 128, upper = P4 (128)."""
    layers = pst_layers(DetectionModel("yolo11n-pst.yaml", verbose=False))
    assert sorted(layers) == [11, 14]
    p4, p3 = layers[11], layers[14]
    assert (p4.cv1.conv.in_channels, p4.cvup.conv.in_channels, p4.cv2.conv.out_channels, len(p4.blocks)) == (
        384,
        256,
        128,
        1,
    )
    assert (p3.cv1.conv.in_channels, p3.cvup.conv.in_channels, p3.cv2.conv.out_channels, len(p3.blocks)) == (
        256,
        128,
        64,
        1,
    )
    assert p4.f == [-1, 8] and p3.f == [-1, 6]


def test_scaling_width_depth_and_fixed_width():
    m = pst_layers(DetectionModel("yolo11m-pst.yaml", verbose=False))[11]  # m: width 1.0, max_channels 512
    assert m.cv2.conv.out_channels == 512 and m.blocks[0].attn.num_heads == 8
    large = pst_layers(DetectionModel("yolo11l-pst.yaml", verbose=False))[11]  # l: depth 1.0 -> 2 stacked blocks
    assert len(large.blocks) == 2
    fixed = pst_layers(DetectionModel("yolo12n-pst.yaml", verbose=False))[11]  # PSTFixedWidth: c2 not scaled
    assert fixed.cv2.conv.out_channels == 512


def test_short_names_resolve_to_shipped_configs():
    assert find_model_config("yolo11s-pst.yaml").name == "yolo11-pst.yaml"
    assert find_model_config("yolo12-pst.yaml").name == "yolo12-pst.yaml"
    assert find_model_config("yolo11n.yaml") is None
    assert len(model_configs()) >= 3


def test_stock_yaml_untouched():
    model = DetectionModel("yolo11n.yaml", verbose=False)
    assert not pst_layers(model) and sum(p.numel() for p in model.parameters()) == 2624080


BAD_ROWS = {
    "one from": ("[-1, 1, PST, [256, 2, 0.5]]", "layer 14.*two inputs"),
    "missing upper": ("[[-1, 30], 1, PST, [256, 2, 0.5]]", "layer 14.*not an earlier layer"),
    "not half": ("[[-1, 8], 1, PST, [256, 2, 0.5]]", "layer 14.*half the fine map"),
    "C' not multiple of 32": ("[[-1, 6], 1, PST, [192, 2, 0.5]]", "layer 14.*multiple of 32"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_fail_at_build_naming_the_layer(case, tmp_path):
    row, message = BAD_ROWS[case]
    text = find_model_config("yolo11-pst.yaml").read_text()
    text = text.replace("[[-1, 6], 2, PST, [256, 2, 0.5]]", row)
    assert row in text
    path = tmp_path / "yolo11n-bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        DetectionModel(str(path), verbose=False)


def test_startup_hook_registers_for_stock_ultralytics():
    code = "import ultralytics.nn.tasks as t, sys; print(hasattr(t, 'PST'), 'pst_yolo' in sys.modules)"
    assert run_python(code).stdout.split() == ["True", "True"]
    assert run_python(code, PST_YOLO_DISABLE_HOOK="1").stdout.split() == ["False", "False"]
    assert run_python("import json, sys; print('pst_yolo' in sys.modules, 'torch' in sys.modules)").stdout.split() == [
        "False",
        "False",
    ]


def test_checkpoint_loads_in_fresh_process_with_safe_load(tmp_path):
    model = YOLO("yolo11n-pst.yaml")
    path = tmp_path / "model.pt"
    model.save(path)
    code = f"""
        import torch
        from ultralytics import YOLO
        m = YOLO({str(path)!r}).model.eval()
        print(type(m.model[11]).__module__, m(torch.zeros(1, 3, 64, 64))[0].shape[1])
    """
    for safe in ("0", "1"):
        result = run_python(code, ULTRALYTICS_SAFE_LOAD=safe)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-2:] == ["pst_yolo.nn.pst", "84"]


def test_fuse_keeps_fine_attention_exact():
    torch.manual_seed(0)
    model = DetectionModel("yolo11n-pst.yaml", verbose=False)
    model.train()
    for _ in range(2):  # move BN statistics (upper and fine) away from their init
        model(torch.randn(2, 3, 128, 128) * 2 + 0.5)
    model.eval()
    x = torch.rand(1, 3, 160, 224)
    before = model(x)[0]
    model.fuse(verbose=False)
    assert model.is_fused()
    torch.testing.assert_close(model(x)[0], before, atol=1e-3, rtol=1e-4)


def test_ddp_state_file_unpickles_in_fresh_interpreter(tmp_path):
    """Ultralytics 8.4 DDP workers unpickle the trainer's model: run that load in a fresh interpreter."""
    from ultralytics.utils.dist import generate_ddp_file

    trainer = type("Trainer", (), {})()  # generate_ddp_file reads only these attributes
    trainer.args = type("Args", (), {})()
    trainer.model = DetectionModel("yolo11n-pst.yaml", verbose=False)
    trainer.callbacks = {}
    entry = generate_ddp_file(trainer)
    state_file = entry.replace(".py", ".pt")
    try:
        code = f"""
            from ultralytics.utils.patches import torch_load
            state = torch_load({state_file!r}, map_location="cpu")
            print(type(state["model"].model[11]).__name__)
        """
        result = run_python(code, PST_YOLO_DISABLE_HOOK="1")  # unpickling alone must bring the plugin in
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-1] == "PST"
    finally:
        for f in (entry, state_file):
            os.remove(f)


def test_cli_splits_plugin_keys():
    ours, rest = split_plugin_args(["val", "model=a.pt", "topk=0", "attn_backend=naive", "imgsz=320"])
    assert ours == {"topk": "0", "attn_backend": "naive"} and rest == ["val", "model=a.pt", "imgsz=320"]


def test_python_m_entrypoint_and_bad_topk():
    import ultralytics

    env = {**ENV, "YOLO_VERBOSE": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "pst_yolo", "version"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and ultralytics.__version__ in result.stdout + result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pst_yolo", "val", "topk=eight"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "topk must be a non-negative integer" in result.stderr
