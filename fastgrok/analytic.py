"""The analytic solution of modular addition (Gromov 2023) as weights of the paper's model:

    U[k, i] = A cos(2 pi s_k i / p + a_k)
    V[k, j] = A cos(2 pi s_k j / p + b_k)
    W[q, k] = A cos(-2 pi s_k q / p - a_k - b_k),      A = (2 / N)^(1/3)

with random frequencies s_k in 1..p-1 and random phases a_k, b_k. Through phi(x) = x^2 the cross term of each
neuron is proportional to cos(2 pi s_k (m + n - q) / p) plus terms whose random phases cancel over neurons,
so the output peaks at q = (m + n) mod p once enough neurons cover the frequencies.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastgrok.data import generator


def analytic_weights(p: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, V (p, N) and W (N, p) in the population layout (U[i, k] = the formula's U[k, i])."""
    g = generator(seed, "analytic")
    s = torch.randint(1, p, (width,), generator=g).double()
    a = torch.rand(width, generator=g, dtype=torch.float64) * 2 * math.pi
    b = torch.rand(width, generator=g, dtype=torch.float64) * 2 * math.pi
    amp = (2 / width) ** (1 / 3)
    i = torch.arange(p, dtype=torch.float64)[:, None]
    theta = 2 * math.pi * s[None, :] * i / p  # (p, N)
    U = amp * torch.cos(theta + a)
    V = amp * torch.cos(theta + b)
    W = amp * torch.cos(-theta - a - b).T  # (N, p)
    return U.float(), V.float(), W.float()


def analytic_grid(p: int, widths: str, seed: int = 0, alpha: float = 0.5, device: str = "cpu"):
    """The run's grid (a model per width), its settings and device; bad input, or a model too large for the
    device, raises ConfigError."""
    from fastgrok.backends import TorchBackend
    from fastgrok.config import Grid, Settings
    from fastgrok.errors import ConfigError
    from fastgrok.planner import plan
    from fastgrok.device import resolve_device

    if p < 3:
        raise ConfigError(f"the analytic solution needs p >= 3, got {p}")
    grid = Grid.parse({"width": widths, "seed": str(seed), "alpha": str(alpha)})
    settings, dev = Settings(op="add", p=p, steps=0, act="quad"), resolve_device(device)
    plan(grid, settings, dev, TorchBackend())
    return grid, settings, dev


def analytic_run(out=None, p: int = 97, widths: str = "500", op: str = "add", seed: int = 0, alpha: float = 0.5,
                 device: str = "cpu") -> tuple[list, Path]:
    """Save the analytic solution at each width as a run directory (steps 0; `out`, or a new runs/<timestamp>)
    that `ipr` and `prune` accept, with accuracy-vs-width.png for several widths. Returns its models.csv rows
    with `all_acc`, the accuracy over all p^2 pairs, and the directory. Its metrics use the split of a model with
    this alpha and seed (nothing was trained on it)."""
    from dataclasses import replace

    from fastgrok.errors import ConfigError
    from fastgrok.ipr import model_ipr
    from fastgrok.plots import accuracy_vs_width
    from fastgrok.population import Population
    from fastgrok.results import RunWriter, default_out_dir
    from fastgrok.train import model_rows

    if op != "add":
        raise ConfigError(f"the analytic solution is known for add only, got --op {op}")
    grid, settings, dev = analytic_grid(p, widths, seed, alpha, device)
    out = default_out_dir() if out is None else Path(out)  # once the input is known good: a refusal leaves nothing
    writer = RunWriter(out, grid, settings, dev, "analytic", extra={"analytic": "Gromov 2023, A = (2/N)^(1/3)"})
    rows = []
    for model, h in enumerate(grid.models()):
        pop = Population([h], settings, dev, model_ids=[model])
        for name, w in zip("UVW", analytic_weights(p, h.width, h.seed)):
            pop.tensors[name].copy_(w[None])
        metrics = pop.evaluate()
        x_all, z_all = pop.table
        pred, _ = pop.family.outputs(pop.tensors, x_all[:, None], z_all[None], settings)
        history = {"model": [model], "step": [0], **{k: [v[0].item()] for k, v in metrics.items()}}
        history["ipr"] = [model_ipr(pop.family, pop.tensors)[0].item()]
        row = model_rows(pop, metrics, history)[0]
        writer.add_population([row], history, pop.weights())
        rows.append(replace(row, extra={"all_acc": (pred[0] == z_all).double().mean().item()}))
    writer.finish("complete")
    if len(rows) > 1:
        accuracy_vs_width([r["width"] for r in rows], [r["all_acc"] for r in rows], out / "accuracy-vs-width.png",
                          f"analytic solution, p {p}")
    return rows, out
