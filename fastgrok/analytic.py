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
    from fastgrok.config import Grid, Settings
    from fastgrok.errors import ConfigError
    from fastgrok.population import plan
    from fastgrok.train import resolve_device

    if p < 3:
        raise ConfigError(f"the analytic solution needs p >= 3, got {p}")
    grid = Grid.parse({"width": widths, "seed": str(seed), "alpha": str(alpha)})
    settings, dev = Settings(op="add", p=p, steps=0, act="quad"), resolve_device(device)
    plan(grid.models(), settings, dev)
    return grid, settings, dev


def analytic_run(out, p: int = 97, widths: str = "500", seed: int = 0, alpha: float = 0.5,
                 device: str = "cpu") -> list[dict]:
    """Save the analytic solution at each width as a run directory (steps 0) that `ipr` and `prune` accept.
    Its metrics use the split of a model with this alpha and seed (nothing was trained on it); `all_acc`
    is the accuracy over all p^2 pairs."""
    from pathlib import Path

    from fastgrok.ipr import neuron_ipr
    from fastgrok.population import Population, torch_outputs
    from fastgrok.results import RunWriter
    from fastgrok.train import model_rows

    grid, settings, dev = analytic_grid(p, widths, seed, alpha, device)
    writer = RunWriter(Path(out), grid, settings, dev, "analytic", extra={"analytic": "Gromov 2023, A = (2/N)^(1/3)"})
    rows = []
    for model, h in enumerate(grid.models()):
        pop = Population([h], settings, dev, model_ids=[model])
        for t, w in zip(pop.params, analytic_weights(p, h.width, h.seed)):
            t.copy_(w[None])
        metrics = pop.evaluate()
        m_all, n_all, z_all = pop.pairs
        pred, _ = torch_outputs(pop.U, pop.V, pop.W, m_all[None], n_all[None], z_all[None], "quad", "mse")
        history = {"model": [model], "step": [0], **{k: [v[0].item()] for k, v in metrics.items()}}
        history["ipr"] = [neuron_ipr(*pop.params).model_mean()[0].item()]
        row = model_rows(pop, metrics, history)[0]
        row["all_acc"] = (pred[0] == z_all).double().mean().item()
        rows.append(row)
        writer.add_population([row], history, {"U": pop.U, "V": pop.V, "W": pop.W, "model": torch.tensor([model])})
    writer.finish("complete")
    return rows
