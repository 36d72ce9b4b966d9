"""Test session set-up: Ultralytics offline, with a private settings dir, before anything imports it."""

import os
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="pst-yolo-cfg-"))
os.environ.setdefault("YOLO_VERBOSE", "false")
