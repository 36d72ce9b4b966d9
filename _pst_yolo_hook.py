"""Start-up hook installed as ``pst_yolo.pth``: import ``pst_yolo`` right after ``ultralytics.nn.tasks`` is imported.

This makes the stock ``yolo`` command (and DDP workers, and ``torch.load`` of our checkpoints) see the PST modules
with no extra step. It costs one meta-path lookup per import and never imports torch or Ultralytics itself.
Set ``PST_YOLO_DISABLE_HOOK=1`` to switch it off; what remains then is a hint: a safe load
(``ULTRALYTICS_SAFE_LOAD=1``) of a checkpoint holding pst_yolo modules, refused because pst_yolo was never imported,
says to ``import pst_yolo`` first instead of Ultralytics' generic "types outside the supported format".
"""

import importlib.abc
import os
import sys

TARGET = "ultralytics.nn.tasks"


class _ImportPluginAfterTasks(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of ``ultralytics.nn.tasks`` to import ``pst_yolo`` afterwards (or, with
    ``import_plugin=False``, only to add the safe-load hint)."""

    def __init__(self, import_plugin: bool = True):
        self.import_plugin = import_plugin
        self.resolving = False  # re-entry guard: a second copy of this hook (another path) asks every finder too

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET or self.resolving:
            return None
        self.resolving = True
        try:
            return self._wrapped_spec(fullname, path, target)
        finally:
            self.resolving = False

    def _wrapped_spec(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module
                if getattr(exec_module, "wrapped_by_pst_yolo_hook", False):
                    return spec  # another copy of this hook already wrapped it

                def exec_then_import_plugin(module, _exec=exec_module):
                    _exec(module)
                    if not self.import_plugin:
                        _add_safe_load_hint(module)
                        return
                    import pst_yolo  # noqa: F401  (registers the PST modules into the parser)

                exec_then_import_plugin.wrapped_by_pst_yolo_hook = True
                spec.loader.exec_module = exec_then_import_plugin
                return spec
        return None


def _add_safe_load_hint(tasks) -> None:
    """Wrap ``tasks.torch_safe_load`` so that refusing a checkpoint's pst_yolo classes says to import pst_yolo."""
    stock = getattr(tasks, "torch_safe_load", None)
    if not callable(stock):
        return

    def torch_safe_load(weight, *args, **kwargs):
        try:
            return stock(weight, *args, **kwargs)
        except TypeError as e:
            if "pst_yolo." not in str(e.__cause__):
                raise
            raise TypeError(
                f"{weight} holds pst_yolo modules, and pst_yolo is not imported (PST_YOLO_DISABLE_HOOK is set), so a "
                "safe load (ULTRALYTICS_SAFE_LOAD=1) refuses them: run `import pst_yolo` before loading it, or unset "
                f"PST_YOLO_DISABLE_HOOK.\n{e}"
            ) from e

    torch_safe_load.__doc__ = stock.__doc__
    tasks.torch_safe_load = torch_safe_load


def install():
    """Add the finder once; with PST_YOLO_DISABLE_HOOK set, one that only adds the safe-load hint."""
    disabled = os.environ.get("PST_YOLO_DISABLE_HOOK", "").lower() in ("1", "true", "yes")
    if not any(isinstance(f, _ImportPluginAfterTasks) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportPluginAfterTasks(import_plugin=not disabled))
