"""Draw a `fastgrok bench` JSON again (model-steps/s against population size, a panel per width), with the
targets on one H100 dotted in, beside the JSON (bench.json -> bench.png), and print the tables docs/performance.md
takes from it: each target against the best rate measured for it, and per width the best Triton variant against
the best PyTorch one:

    python bench/plot_bench.py bench/results/h100-2026-11-22/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastgrok.plots import bench_throughput

# the targets on one H100 (docs/performance.md), p 97, alpha 0.5, MSE, full-batch AdamW: (variant, N) -> model-steps/s
TARGETS = {("triton-tf32", 512): 150_000, ("triton-fp32", 512): 30_000, ("triton-bf16", 512): 250_000,
           ("triton-tf32", 128): 400_000, ("triton-tf32", 2048): 40_000}


def best(report: dict) -> dict[tuple[str, int], dict]:
    """(variant, N) -> its fastest measured row (over population sizes)."""
    measured = sorted((r for r in report["results"] if r["model_steps_per_s"] > 0), key=lambda r: r["model_steps_per_s"])
    return {(r["backend"], r["width"]): r for r in measured}  # the fastest last, so it stays


def _cell(row: dict | None) -> str:
    return f"{row['backend']} {row['model_steps_per_s'] / 1e3:.1f}k ({row['models']})" if row else "-"


def tables(report: dict, targets: dict[tuple[str, int], float]) -> str:
    """Markdown: the targets against the best measured rate (gap = target / measured), then per width the best
    Triton variant against the best PyTorch one (the reference.py loop apart)."""
    fastest = best(report)
    lines = ["| target | measured (B) | gap |", "| --- | ---: | ---: |"]
    for (variant, width), target in targets.items():
        row = fastest.get((variant, width))
        measured = f"{row['model_steps_per_s'] / 1e3:.1f}k ({row['models']})" if row else "not measured"
        gap = f"{target / row['model_steps_per_s']:.1f}x" if row else ""
        lines.append(f"| N {width}, {variant}: {target / 1e3:g}k | {measured} | {gap} |")
    lines += ["", "| N | best triton (B) | best torch (B) | ratio | reference.py loop |", "| ---: | --- | --- | ---: | ---: |"]
    for width in sorted({w for _, w in fastest}):
        triton, torch = (max((r for (v, w), r in fastest.items() if w == width and v.startswith(kind)),
                             key=lambda r: r["model_steps_per_s"], default=None) for kind in ("triton", "torch"))
        ref = fastest.get(("reference", width))
        ratio = f"{triton['model_steps_per_s'] / torch['model_steps_per_s']:.1f}x" if triton and torch else ""
        loop = f"{ref['model_steps_per_s']:.0f}" if ref else "-"
        lines.append(f"| {width} | {_cell(triton)} | {_cell(torch)} | {ratio} | {loop} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--no-targets", action="store_true", help="leave the H100 targets out (another GPU)")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    targets = {} if args.no_targets else TARGETS
    print(f"wrote {bench_throughput(report, args.report.with_suffix('.png'), targets or None)}")
    print(tables(report, targets))


if __name__ == "__main__":
    main()
