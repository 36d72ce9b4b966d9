"""Start-up hook installed as ``pst_yolo.pth``: import ``pst_yolo`` right after ``ultralytics.nn.tasks`` is imported.

This makes the stock ``yolo`` command (and DDP workers, and ``torch.load`` of our checkpoints) see the PST modules
with no extra step. It costs one meta-path lookup per import and never imports torch or Ultralytics itself.
Set ``PST_YOLO_DISABLE_HOOK=1`` to switch it off.
"""

import importlib.abc
import os
import sys

TARGET = "ultralytics.nn.tasks"


class _ImportPluginAfterTasks(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of ``ultralytics.nn.tasks`` to import ``pst_yolo`` afterwards."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_import_plugin(module, _exec=exec_module):
                    _exec(module)
                    import pst_yolo  # noqa: F401  (registers the PST modules into the parser)

                spec.loader.exec_module = exec_then_import_plugin
                return spec
        return None


def install():
    """Add the finder once, unless PST_YOLO_DISABLE_HOOK is set."""
    if os.environ.get("PST_YOLO_DISABLE_HOOK", "").lower() in ("1", "true", "yes"):
        return
    if not any(isinstance(f, _ImportPluginAfterTasks) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportPluginAfterTasks())
