"""``python -m pst_yolo`` runs the ``pst-yolo`` command."""

from .cli import main

main()
