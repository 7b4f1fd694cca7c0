"""The torch backend's CPU working-set size (fastgrok.population.CPU_CHUNK_BYTES) side by side, in one run.

On a CPU the step walks the population in chunks of models, and a large model in spans of its examples, so that
a pass's (examples, N) activations take at most CPU_CHUNK_BYTES. This times full training steps (forward,
backward, optimizer) at several sizes, interleaved so that a busy machine slows all alike, best of --repeats:

    python bench/cpu_chunks.py --out bench/results/cpu-2core-chunks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fastgrok.backends as backends
import fastgrok.population as population
from fastgrok.results import device_name, versions
from fastgrok.config import Hyper, Settings

CASES = {
    "cpu-demo: p 47, N 128, 39 models": (Settings(p=47), [Hyper(width=128, xi=x / 20, wd=w) for x in range(13)
                                                          for w in (0, 5, 15)]),
    "p 97, N 128, 16 models": (Settings(), [Hyper(width=128, seed=i) for i in range(16)]),
    "p 97, N 500, 1 model": (Settings(), [Hyper(width=500)]),
    "p 97, N 500, 16 models": (Settings(), [Hyper(width=500, seed=i) for i in range(16)]),
    "p 97, N 500, alpha 0.1..0.9, 9 models": (Settings(), [Hyper(width=500, alpha=k / 10) for k in range(1, 10)]),
}
SIZES_MIB = (24, 8, 4, 2, 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    default = population.CPU_CHUNK_BYTES
    results = {}
    for name, (settings, hypers) in CASES.items():
        pop = population.Population(hypers, settings, "cpu")
        engine = backends.TorchBackend()
        engine.step(pop)
        best = dict.fromkeys(SIZES_MIB, float("inf"))
        for _ in range(args.repeats):
            for mib in SIZES_MIB:
                population.CPU_CHUNK_BYTES = mib << 20
                start = time.perf_counter()
                for _ in range(args.steps):
                    engine.step(pop)
                best[mib] = min(best[mib], (time.perf_counter() - start) / args.steps)
        results[name] = {f"{mib} MiB": round(len(hypers) / seconds, 1) for mib, seconds in best.items()}
        print(f"{name}: model-steps/s " + ", ".join(f"{k} {v}" for k, v in results[name].items()), flush=True)
    population.CPU_CHUNK_BYTES = default
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d"), "device": device_name(torch.device("cpu")), "cpu": cpu_model(),
                  "versions": versions(), "default_mib": default >> 20, "repeats": args.repeats,
                  "model_steps_per_s": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
