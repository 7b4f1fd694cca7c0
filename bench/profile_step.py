"""Where a Triton step's time goes: the forward (+ loss gradient), the backward and the optimizer, each timed
alone at the backend's defaults, for a few widths (p 97, alpha 0.5, MSE, AdamW). With --dropout, every model
drops that fraction of its hidden units, and the step's masks (kernels/dropout.py) are timed too.

    python bench/profile_step.py --precision tf32 --models 1024 --width 128,512,2048 --scatter window,block [--dropout 0.2]
"""

import argparse
import itertools
import json

import torch

from fastgrok.backends import finish_step
from fastgrok.bench import TRITON_STEPS, _timed, flops_per_model_step
from fastgrok.config import Hyper, Settings
from fastgrok.kernels.optimizer import optimizer_step_
from fastgrok.population import Population


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="tf32")
    parser.add_argument("--scatter", default="window",
                        help="the step's scatter (fastgrok.bench TRITON_STEPS: window, the default step; block, "
                             "kernels/block.py), or a comma list to profile each")
    parser.add_argument("--models", type=int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--width", default="128,500,512,2048",
                        help="500: the phase diagrams' width, whose rows are not multiples of 16 (ALIGN_N 4)")
    parser.add_argument("--p", type=int, default=97)
    parser.add_argument("--device", default="cuda", help="cpu: under TRITON_INTERPRET=1, to check the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, settings = torch.device(args.device), Settings(p=args.p)
    rows = []
    for width, scatter in itertools.product(map(int, args.width.split(",")), args.scatter.split(",")):
        pop = Population([Hyper(width=width, seed=i, dropout=args.dropout) for i in range(args.models)], settings, dev)
        engine = TRITON_STEPS[scatter](args.precision)
        data = engine.step_data(pop)
        G = engine.forward(pop, data)[1]
        grads = engine.backward(pop, data, G)
        losses = torch.zeros(args.models, device=dev)
        parts = {"masks": lambda: engine.step_data(pop)} if args.dropout else {}
        parts |= {"forward": lambda: engine.forward(pop, data), "backward": lambda: engine.backward(pop, data, G),
                 "finite_check": lambda: finish_step(pop, losses, grads, lambda *a, **k: None),
                 "finite_check+optimizer": lambda: finish_step(pop, losses, grads, optimizer_step_),
                 "step": lambda: engine.step(pop)}
        row = {"width": width, "models": args.models, "precision": args.precision, "scatter": scatter,
               "dropout": args.dropout}
        for name, fn in parts.items():
            row[f"{name}_ms"] = 1e3 * _timed(fn, dev)
        flops = flops_per_model_step(settings.p, width, int(pop.D.max()))
        row["model_steps_per_s"] = args.models / row["step_ms"] * 1e3
        row["tflops"] = row["model_steps_per_s"] * flops / 1e12
        rows.append(row)
        print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if args.out:  # after every row: a profile cut short by its time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        del pop, data, G, grads
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
