"""Which Triton precision may be the default: train the validation grid (xi 0:0.6:13 x wd 0,5,15 at the paper's
settings: p 97, N 500, alpha 0.5, 2000 steps) in every precision and count the models whose phase differs from
fp32's. Writes JSON; the fastest precision with no disagreement becomes the default (else fp32).

    python bench/validate_precision.py --out bench/results/precision-<gpu>.json   (GPU; minutes)
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fastgrok.config import Grid, Settings
from fastgrok.device import device_name
from fastgrok.results import versions
from fastgrok.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precisions", default="fp32,tf32,tf32x3,bf16")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    grid = Grid.parse({"xi": "0:0.6:13", "wd": "0,5,15"})
    settings = Settings(steps=args.steps)
    report = {"device": device_name(torch.device("cuda")), "versions": versions(), "grid": grid.axes,
              "settings": {"p": settings.p, "steps": settings.steps}, "precisions": {}}
    phases = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for precision in args.precisions.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            run = train(grid, settings, Path(tmp) / "run", device="cuda", backend="triton", precision=precision)
            seconds = time.perf_counter() - start
        phases[precision] = [r["phase"] for r in run.rows]
        report["precisions"][precision] = {
            "seconds": round(seconds, 2),
            "phases": phases[precision],
            "test_acc": [round(r["test_acc"], 4) for r in run.rows],
            "train_acc": [round(r["train_acc"], 4) for r in run.rows],
        }
        print(f"{precision}: {seconds:.1f} s")
        # after every precision: a grid cut short by its time limit keeps the precisions it trained
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    for precision, ph in phases.items():
        differ = [i for i, (a, b) in enumerate(zip(ph, phases["fp32"])) if a != b]
        report["precisions"][precision]["models_differing_from_fp32"] = differ
        print(f"{precision}: {len(differ)} of {len(ph)} phases differ from fp32 {differ}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
