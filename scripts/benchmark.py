"""Benchmark suite (same as ``pst-yolo bench``): PSA op, score step, models, training step; see pst_yolo/benchmark.py.

python scripts/benchmark.py --out runs/bench
"""

from pst_yolo.tools.benchmark import main

if __name__ == "__main__":
    main()
