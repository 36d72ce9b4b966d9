"""Test session set-up: Ultralytics offline, with a private settings dir, before anything imports it; under
pytest-xdist (``-n auto``), the CPU cores shared out among the workers and the longest test files first."""

import os
import tempfile
from collections import Counter

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


def pytest_collection_modifyitems(session, config, items):
    """Test files with the most ``slow`` tests first (a stable sort: each file's own order is kept). Under ``-n`` the
    workers take files in this order, so they finish together instead of one running a long file alone at the end."""
    slow_tests = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_tests[item.path])
