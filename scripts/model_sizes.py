"""Print (and optionally write) the model-size table: python scripts/model_sizes.py --markdown-out docs/MODEL_ZOO.md

Same as ``pst-yolo sizes``; see :mod:`pst_yolo.tools.model_sizes` for how parameters and GFLOPs are counted.
"""

from pst_yolo.tools.model_sizes import main

if __name__ == "__main__":
    main()
