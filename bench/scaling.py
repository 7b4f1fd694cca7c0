"""One run spread over several processes: `fastgrok train` of the same grid on 1, 2, ... processes started by
torchrun (on a CPU one thread each; on a GPU machine one GPU each), its model-steps/s, and the scaling efficiency,
rate on K processes / (K x rate on one). The runs' models.csv must be identical (the plan does not depend on the
number of processes), which the JSON records.

    python bench/scaling.py --processes 1,2 --threads 1 --json bench/results/cpu-scaling.json \
        -- --preset cpu-demo --population-size 20
    python bench/scaling.py --processes 1,2,4,8 --json bench/results/h200-scaling.json -- --preset wd-diagram \
        --seed 0:7:8 --population-size 578
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(processes: int, train: list[str], out: Path, threads: int | None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "fastgrok", "train", *train, "--out", str(out)]
    began = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    config = json.loads((out / "config.json").read_text())
    return {"processes": processes, "wall_seconds": round(wall, 2), "train_seconds": config["seconds"],
            "model_steps": config["model_steps"], "model_steps_per_s": round(config["model_steps"] / config["seconds"], 1),
            "populations": config["populations"], "device": config["device"], "backend": config["backend"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma list of process counts")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each process (a CPU's fair share)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("train", nargs="*", help="`fastgrok train` options, after --")
    args = parser.parse_args()
    counts = [int(k) for k in args.processes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in counts:
            results.append(measure(k, args.train, Path(tmp) / f"p{k}", args.threads))
            print(json.dumps(results[-1]), flush=True)
        tables = {(Path(tmp) / f"p{k}" / "models.csv").read_text() for k in counts}
    one = next((r for r in results if r["processes"] == 1), None)
    for r in results:
        if one is not None:
            r["efficiency"] = round(r["model_steps_per_s"] / (r["processes"] * one["model_steps_per_s"]), 3)
    import torch
    import triton

    report = {"date": datetime.date.today().isoformat(), "train": args.train, "threads_per_process": args.threads,
              "torch": torch.__version__, "triton": triton.__version__, "identical_models_csv": len(tables) == 1,
              "runs": results}
    for r in results:
        print(f"{r['processes']} process(es): {r['model_steps_per_s']:,.0f} model-steps/s, {r['train_seconds']:.1f} s "
              f"training, {r['wall_seconds']:.1f} s wall" + (f", efficiency {r['efficiency']:.0%}" if "efficiency" in r else ""))
    print("models.csv identical across process counts:", report["identical_models_csv"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
