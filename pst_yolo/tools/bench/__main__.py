"""``python -m pst_yolo.tools.bench``: the same as ``pst-yolo bench``."""

from . import main

main()
