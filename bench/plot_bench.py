"""Draw a `fastgrok bench` JSON again (model-steps/s against population size, a panel per width), with issue 3's
targets on one H100 dotted in, beside the JSON (bench.json -> bench.png):

    python bench/plot_bench.py bench/results/h100-2026-11-22/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastgrok.plots import bench_throughput

# issue 3, p 97, alpha 0.5, MSE, full-batch AdamW on one H100: (variant, N) -> model-steps/s
TARGETS = {("triton-tf32", 512): 150_000, ("triton-fp32", 512): 30_000, ("triton-bf16", 512): 250_000,
           ("triton-tf32", 128): 400_000, ("triton-tf32", 2048): 40_000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--no-targets", action="store_true", help="leave the H100 targets out (another GPU)")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    print(f"wrote {bench_throughput(report, args.report.with_suffix('.png'), None if args.no_targets else TARGETS)}")


if __name__ == "__main__":
    main()
