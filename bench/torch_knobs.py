"""The torch backend's size settings side by side, in one run: each value of one knob on the same populations.

`--knob chunk`: the working-set size, fastgrok.backends.CPU_CHUNK_BYTES (the step walks the population in
chunks of models, and a large model in spans of its examples, so that a pass's (examples, N) activations take
at most that). `--knob pad`: fastgrok.families.mlp.CPU_PAD_BELOW, the p below which the outputs are padded to a
multiple of 8 (here: never, or at every p). `--knob gpu-pad`: the same on a GPU (GPU_PAD_BELOW), each case in fp32
and in TF32: whether p 97's products (no multiple of 4) keep cuBLAS's TF32 off the tensor cores. `--knob malloc`:
fastgrok.process.CPU_MALLOC, glibc's malloc settings for a run on the CPU, against glibc's own; mallopt cannot
be undone, so each value runs in a process of its own, the two taking turns. Full training steps (forward, backward,
optimizer), interleaved so that a busy machine slows all values alike, best of --repeats:

    python bench/torch_knobs.py --knob chunk --out bench/results/cpu-2core-chunks.json
    python bench/torch_knobs.py --knob pad --out bench/results/cpu-2core-pad.json
    python bench/torch_knobs.py --knob gpu-pad --out torch-pad.json      # on a GPU (bench/gpu_session.sh torchpad)
    python bench/torch_knobs.py --knob malloc --out bench/results/cpu-2core-malloc.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import torch

import fastgrok.backends as backends
import fastgrok.families.mlp as mlp
import fastgrok.process as process
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population
from fastgrok.device import device_name
from fastgrok.results import versions

DEMO = (Settings(p=47), [Hyper(width=128, xi=x / 20, wd=w) for x in range(13) for w in (0, 5, 15)])
SIZES = {
    "cpu-demo: p 47, N 128, 39 models": DEMO,
    "p 97, N 128, 16 models": (Settings(), [Hyper(width=128, seed=i) for i in range(16)]),
    "p 97, N 500, 1 model": (Settings(), [Hyper(width=500)]),
    "p 97, N 500, 16 models": (Settings(), [Hyper(width=500, seed=i) for i in range(16)]),
    "p 97, N 500, alpha 0.1..0.9, 9 models": (Settings(), [Hyper(width=500, alpha=k / 10) for k in range(1, 10)]),
}
KNOBS = {  # module, setting, {label: value}, {case: (settings, models)}
    "chunk": (backends, "CPU_CHUNK_BYTES", {f"{mib} MiB": mib << 20 for mib in (24, 8, 4, 2, 1)}, SIZES),
    "malloc": (process, "CPU_MALLOC", {"glibc's own": {}, "CPU_MALLOC": process.CPU_MALLOC}, {
        **SIZES, "p 97, N 500, 128 models (optimizer buffers over 32 MiB)":
            (Settings(), [Hyper(width=500, seed=i) for i in range(128)])}),
    "pad": (mlp, "CPU_PAD_BELOW", {"no padding": 0, "p padded to 8": 1 << 30}, {
        "p 13, N 32, 64 models": (Settings(p=13), [Hyper(width=32, seed=i) for i in range(64)]),
        "p 23, N 64, 32 models": (Settings(p=23), [Hyper(width=64, seed=i) for i in range(32)]),
        "cpu-demo: p 47, N 128, 39 models": DEMO,
        "cpu-demo with cross-entropy": (Settings(p=47, loss="ce"), DEMO[1]),
        "p 61, N 256, 8 models": (Settings(p=61), [Hyper(width=256, seed=i) for i in range(8)]),
        "p 97, N 128, 16 models": (Settings(), [Hyper(width=128, seed=i) for i in range(16)]),
        "p 97, N 500, 4 models": (Settings(), [Hyper(width=500, seed=i) for i in range(4)]),
        "p 113, N 128, 8 models": (Settings(p=113), [Hyper(width=128, seed=i) for i in range(8)]),
    }),
    "gpu-pad": (mlp, "GPU_PAD_BELOW", {"no padding": 0, "p padded to 8": 1 << 30}, {
        f"p {p}, N {width}, {models} models": (Settings(p=p), [Hyper(width=width, seed=i) for i in range(models)])
        for p, width, models in ((97, 128, 1024), (97, 512, 1024), (97, 2048, 128), (61, 512, 1024), (113, 512, 512))
    }),
}


PER_PROCESS = {"malloc"}  # settings a process cannot take back


def timed(engine, pop, steps: int) -> float:
    """Seconds per training step, over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(pop)
    if pop.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def worker(conn, knob: str, value, steps: int) -> None:
    """A process with one value of a PER_PROCESS knob: times the case it is sent, holding one case at a time."""
    module, setting, _, cases = KNOBS[knob]
    setattr(module, setting, value)
    process.tune_cpu()
    held = None
    while (case := conn.recv()) is not None:
        if held is None or held[0] != case:
            held = None  # the last case's population goes before the next is built
            settings, hypers = cases[case]
            held = case, Population(hypers, settings, "cpu"), backends.TorchBackend()
        conn.send(timed(held[2], held[1], steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knob", choices=KNOBS, default="chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    module, setting, values, cases = KNOBS[args.knob]
    device = torch.device("cuda" if setting.startswith("GPU") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--knob {args.knob} needs a CUDA device")
    # on a GPU every case in fp32 and in TF32 (the bench's torch and torch-tf32 baselines)
    modes = {" (fp32)": False, " (TF32)": True} if device.type == "cuda" else {"": False}
    default, default_tf32 = getattr(module, setting), torch.backends.cuda.matmul.allow_tf32
    workers = {}
    if device.type == "cpu" and args.knob not in PER_PROCESS:
        process.tune_cpu()  # as a run on the CPU does
    if args.knob in PER_PROCESS:
        context = multiprocessing.get_context("spawn")
        for label, value in values.items():
            conn, theirs = context.Pipe()
            workers[label] = conn, context.Process(target=worker, args=(theirs, args.knob, value, args.steps))
            workers[label][1].start()

    results = {}
    try:
        for case, (settings, hypers) in cases.items():
            if workers:
                def measure(label: str, case=case) -> float:
                    workers[label][0].send(case)
                    return workers[label][0].recv()
            else:
                pop = Population(hypers, settings, device)
                engine = backends.TorchBackend()

                def measure(label: str, pop=pop, engine=engine) -> float:
                    setattr(module, setting, values[label])
                    return timed(engine, pop, args.steps)
            for mode, tf32 in modes.items():
                torch.backends.cuda.matmul.allow_tf32 = tf32
                for label in values:  # warm-up, also of cuBLAS's choice for each shape
                    measure(label)
                best = dict.fromkeys(values, float("inf"))
                for _ in range(args.repeats):
                    for label in values:
                        best[label] = min(best[label], measure(label))
                name = case + mode
                results[name] = {label: round(len(hypers) / seconds, 1) for label, seconds in best.items()}
                print(f"{name}: model-steps/s " + ", ".join(f"{k} {v}" for k, v in results[name].items()), flush=True)
            pop = engine = measure = None
    finally:
        setattr(module, setting, default)
        torch.backends.cuda.matmul.allow_tf32 = default_tf32
        for conn, worker_process in workers.values():
            conn.send(None)
            worker_process.join()
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d"), "device": device_name(device),
                  "versions": versions(), "knob": setting, "default": default, "repeats": args.repeats,
                  "model_steps_per_s": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
