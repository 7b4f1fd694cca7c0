"""Tiles of the Triton step on a GPU: model-steps/s for each forward tile (backward at its default), then for
each backward tile, scatter and fused-or-not (forward at its default), at one width.

    python bench/sweep_blocks.py --width 512 --models 1024 --precision tf32 --out sweep.json
    python bench/sweep_blocks.py --summary sweep.json      # the fastest of each kind, to set the defaults

What it is for: the two scatters of the backward against each other (kernels/backward.py: "window", the default,
measured the fastest on an H100; kernels/block.py: "block", whose loop the compiler can software-pipeline, not yet
measured), and the tiles: the backward re-reads G (D x p per model) once per chunk of block_n neurons and the
forward re-reads W per tile of block_d examples, so tiles trade re-reads against registers, and only dots of 64
rows reach Hopper's wgmma (bench/kernel_resources.py). Measure, then set the defaults in kernels/forward.py TILES,
kernels/backward.py TILES and STEP, and kernels/block.py BLOCK_STEP, and keep or remove kernels/block.py."""

import argparse
import itertools
import json

import torch

from fastgrok.bench import TRITON_STEPS, _timed, flops_per_model_step
from fastgrok.config import Hyper, Settings
from fastgrok.kernels.block import G_TWICE_PRECISIONS
from fastgrok.population import Population

TILES = [{"block_d": d, "block_n": n, "num_warps": w} for d, n, w in itertools.product((32, 64), (32, 64), (4, 8))]
# the forward with 128 examples a tile reads W half as often per FLOP (docs/performance.md: it runs at a quarter of
# peak); 128 x 64 does not fit an SM's shared memory (3 stages of U, V and W tiles: 262 KB), these do (Triton 3.6,
# sm_90)
FORWARD_WIDE = [{"block_d": 128, "block_n": n, "num_warps": w} for n, w in ((16, 8), (32, 8), (32, 4))]
# the block scatter's pipeline depth, at the tiles where all its dots have 64 rows (the TILES above run at its
# default, kernels/block.py BLOCK_STEP: 2 in tf32; Triton's default is 3)
STAGES = [{"block_d": d, "block_n": 64, "num_warps": w, "num_stages": s}
          for d, w, s in itertools.product((32, 64), (4, 8), (3, 4))]
# the fused block backward in tf32 reads each tile of G twice so that the compiler pipelines both loads
# (kernels/block.py G_TWICE); read once, the loop waits for it but moves half the bytes from L2 and needs less
# shared memory (64 x 64 x 4: two programs an SM instead of one; Triton 3.6, sm_90). Which wins is this sweep's.
G_ONCE = [{"block_d": d, "block_n": 64, "num_warps": w, "num_stages": 2, "g_twice": False}
          for d, w in itertools.product((32, 64), (4, 8))]
# the fused block backward on chunks of 128 neurons: G (its main stream of bytes) and the blocks' U, V rows read half
# as often as at 64, for a d_w accumulator twice as large. Compiled (Triton 3.6, sm_90, 8 warps, 2 stages, tf32):
# 32 x 128 spills 232 B (G twice, 144 KB of shared memory) or 224 B (once, 112 KB), one program an SM
# (docs/performance.md); 4 warps spill 1.5 KB and are not swept.
WIDE_N = [{"block_d": d, "block_n": 128, "num_warps": 8, "num_stages": 2, "g_twice": g}
          for d, g in itertools.product((32, 64), (True, False))]


def best(results: list[dict]) -> dict[str, dict]:
    """The fastest configuration of each kind a sweep measured: the forward in each example order, and the
    backward for each scatter, fused or not; what kernels/forward.py TILES, kernels/backward.py STEP and
    kernels/block.py BLOCK_STEP take from a sweep (keyed "forward window", "forward block", "backward window fused", ...)."""
    found = {}
    for r in results:
        scatter = r.get("scatter", "window")
        kind = (f"forward {scatter}" if "forward_tiles" in r
                else f"backward {scatter} {'fused' if r.get('fused') else 'two launches'}")
        if kind not in found or r["model_steps_per_s"] > found[kind]["model_steps_per_s"]:
            found[kind] = r
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--models", type=int, default=1024)
    parser.add_argument("--precision", default="tf32")
    parser.add_argument("--p", type=int, default=97)
    parser.add_argument("--device", default="cuda", help="cpu: under TRITON_INTERPRET=1, to check the script")
    parser.add_argument("--backward-only", action="store_true",
                        help="only the backward with 64 neurons, both scatters, fused or not (one precision's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--summary", default=None, metavar="SWEEP_JSON",
                        help="print the fastest configuration of each kind in a sweep's JSON (no GPU needed)")
    args = parser.parse_args()
    if args.summary:
        with open(args.summary) as f:
            sweep = json.load(f)
        print(f"N {sweep['width']}, B {sweep['models']}, {sweep['precision']}:")
        for kind, r in sorted(best(sweep["results"]).items()):
            tiles = r.get("forward_tiles", r.get("backward_tiles"))
            print(f"  {kind:>28}: {r['model_steps_per_s']:>10,.0f} model-steps/s  {tiles}")
        return
    dev = torch.device(args.device)
    settings = Settings(p=args.p)
    pop = Population([Hyper(width=args.width, seed=i) for i in range(args.models)], settings, dev)
    flops = flops_per_model_step(settings.p, args.width, int(pop.D.max()))
    # forward tiles: the per-example forward, and the block forward (scatter "block": U, V rows from a window per
    # block of the (m, n) table), whose backward then is the block scatter's at its default
    configs = [] if args.backward_only else [{"forward_tiles": t, **s} for s in ({}, {"scatter": "block"})
                                             for t in TILES + FORWARD_WIDE]
    tiles = [t for t in TILES if t["block_n"] == 64] if args.backward_only else TILES
    configs += [{"backward_tiles": t, "scatter": s, "fused": f}
                for t, s, f in itertools.product(tiles, ("window", "block"), (False, True))]
    if not args.backward_only:
        configs += [{"backward_tiles": t, "scatter": "block", "fused": f} for t, f in itertools.product(STAGES, (False, True))]
    if args.precision in G_TWICE_PRECISIONS:
        configs += [{"backward_tiles": t, "scatter": "block", "fused": True} for t in G_ONCE]
    if not args.backward_only:  # (g_twice matters in G_TWICE_PRECISIONS only: elsewhere one of each pair)
        wide = WIDE_N if args.precision in G_TWICE_PRECISIONS else [t for t in WIDE_N if t["g_twice"]]
        configs += [{"backward_tiles": t, "scatter": "block", "fused": True} for t in wide]
    results = []
    for config in configs:
        # the step of the config's scatter (fastgrok.bench.TRITON_STEPS), the config's other keys its options
        options = {k: v for k, v in config.items() if k != "scatter"}
        engine = TRITON_STEPS[config.get("scatter", "window")](args.precision, **options)
        try:
            sec = _timed(lambda: engine.step(pop), dev)
        except Exception as e:  # out of resources for this tile: record and go on
            print(f"{config}: {type(e).__name__}")
            continue
        rate = args.models / sec
        results.append({**config, "model_steps_per_s": rate, "tflops": rate * flops / 1e12})
        print(f"{config}: {rate:>10,.0f} model-steps/s {rate * flops / 1e12:6.1f} TFLOP/s")
        if args.out:  # after every config: a sweep cut short by its time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"width": args.width, "models": args.models, "precision": args.precision, "results": results},
                          f, indent=2)


if __name__ == "__main__":
    main()
