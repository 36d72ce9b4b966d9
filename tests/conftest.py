"""Test session set-up: Ultralytics offline, with a private settings dir, before anything imports it; under
pytest-xdist (``-n auto``), the CPU cores shared out among the workers."""

import os
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="pst-yolo-cfg-"))
os.environ.setdefault("YOLO_VERBOSE", "false")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # One OpenMP thread per worker and core: workers that each start a thread per core oversubscribe the machine,
    # and spinning OpenMP threads slow every process down. Subprocesses (the yolo CLI) inherit the setting.
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_configure(config):
    """Under ``-n`` each test file runs on one worker (``--dist loadfile``): the module-scoped fixtures (trained and
    calibrated checkpoints, exports) are built once, not once per worker."""
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadfile"
