"""Analytic solutions of the 2-layer MLP as weights of the paper's model (saved as runs by `fastgrok analytic`).

Addition of S terms (Gromov 2023 for S = 2; "Grokking modular polynomials", Doshi, He, Das, Gromov 2024, eq. 2),
with phi(x) = x^S:

    U_s[k, i] = A cos(2 pi f_k i / p + a_sk)                      s = 1..S (U, V for S = 2)
    W[q, k]   = A cos(-2 pi f_k q / p - a_1k - ... - a_Sk),       A = (2^S / (N S!))^(1/(S+1))

with random frequencies f_k in 1..p-1 and random phases. Expanding W (sum_s U_s)^S, the one term of each neuron
without a leftover random phase is (S! / 2^S) A^(S+1) cos(2 pi f_k (x_1 + ... + x_S - q) / p): their mean over
the neurons peaks at q = (x_1 + ... + x_S) mod p, and the other terms cancel as N grows (the width needed grows
exponentially with S). (S = 2: A = (2/N)^(1/3), Gromov's.) The sequel draws f_k as a random permutation of 1..N
taken mod p; uniform draws from 1..p-1 spare the neurons whose frequency would be 0 mod p.

Multiplication (the sequel's eq. 6, for any S): on the non-zero residues a primitive root g turns products into
sums of discrete logarithms mod p - 1, so N - 1 neurons are the addition solution in the coordinate log_g(i) with
period p - 1 (A from N - 1), weight 0 on input 0 and to output 0; neuron 0 carries zero: weight 1 from input 0
of every operand and 1 to output 0, so an input with a zero operand gives output 0 at least 1, and one without
gives it nothing.

Any polynomial in x, y (the sequel's Sec. 4, `experts`): a multiplication expert per monomial c x^a y^b, its
output through a low-temperature softmax, and one S-term addition expert over the S monomials.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastgrok.data import generator, is_prime
from fastgrok.errors import ConfigError

OPS = ("add", "mul")


def primitive_root(p: int) -> int:
    """The smallest generator of the multiplicative group mod the prime p."""
    factors = {q for q in range(2, p) if (p - 1) % q == 0 and is_prime(q)}
    return next(g for g in range(1, p) if all(pow(g, (p - 1) // q, p) != 1 for q in factors))


def discrete_log(p: int) -> torch.Tensor:
    """(p,) log_g(i) for i = 1..p-1, g the smallest primitive root (entry 0: -1, no logarithm)."""
    g, out = primitive_root(p), torch.full((p,), -1, dtype=torch.long)
    for k in range(p - 1):
        out[pow(g, k, p)] = k
    return out


def check_analytic(op: str, p: int, terms: int) -> None:
    if op not in OPS:
        raise ConfigError(f"an analytic solution is known for add and mul, got --op {op}")
    if p < 3:
        raise ConfigError(f"the analytic solution needs p >= 3, got {p}")
    if op == "mul" and not is_prime(p):
        raise ConfigError(f"the analytic solution of mul needs a prime p (a primitive root: products become sums "
                          f"of discrete logarithms); {p} is not prime")


def analytic_weights(p: int, width: int, seed: int = 0, terms: int = 2, op: str = "add",
                     draw: tuple = ("analytic",)) -> tuple[torch.Tensor, ...]:
    """The input matrices U_1..U_S (p, N) and W (N, p), in the population layout (U[i, k] = the formula's
    U[k, i]). draw: the random stream of the frequencies and phases (fastgrok.data.generator's)."""
    check_analytic(op, p, terms)
    if op == "mul" and width < 2:
        raise ConfigError("the analytic solution of mul needs a width of 2 or more (one neuron carries zero)")
    g = generator(seed, *draw)
    coord, period, periodic = (torch.arange(p), p, width) if op == "add" else (discrete_log(p), p - 1, width - 1)
    f = torch.randint(1, period, (periodic,), generator=g).double()
    phases = torch.rand(terms, periodic, generator=g, dtype=torch.float64) * 2 * math.pi
    amp = (2**terms / (periodic * math.factorial(terms))) ** (1 / (terms + 1))
    theta = 2 * math.pi * f[None, :] * coord[:, None].double() / period  # (p, N)
    inputs = [amp * torch.cos(theta + phases[s]) for s in range(terms)]
    W = amp * torch.cos(-theta - phases.sum(0)).T  # (N, p)
    if op == "mul":  # neuron 0 carries zero; the others see only non-zero residues
        one = torch.zeros(p, 1, dtype=torch.float64)
        one[0] = 1.0
        inputs = [torch.cat([one, u.index_fill(0, torch.tensor([0]), 0.0)], 1) for u in inputs]
        W = torch.cat([one.T, W.index_fill(1, torch.tensor([0]), 0.0)], 0)
    return (*(u.float() for u in inputs), W.float())


def experts(op: str, p: int = 97, widths: tuple[int, int] = (500, 2000), seed: int = 0,
            beta: float = 100.0) -> dict:
    """The sequel's network for a polynomial sum_s c_s x^a_s y^b_s (its Sec. 4, eq. 9-13): per monomial the
    analytic multiplication solution (width widths[0]) reading x^a_s and y^b_s, its output through a softmax at
    inverse temperature beta (nearly one-hot), then the S-term addition solution (width widths[1], phi = x^S)
    reading those S outputs scaled by c_s. Returns its monomials, and its accuracy and MSE (mean over the p^2
    inputs and p outputs) against the polynomial's value on all p^2 inputs."""
    from fastgrok.polynomials import evaluate, monomials, parse

    if not is_prime(p):
        raise ConfigError(f"the experts' construction needs a prime p (its multiplication experts do); {p} is not")
    if min(widths) < 2 or not beta > 0:
        raise ConfigError(f"the experts need widths of 2 or more and beta > 0, got widths {widths}, beta {beta:g}")
    node = parse(op)
    terms = monomials(node, p)
    if not terms:
        raise ConfigError(f"{op!r} is 0 mod {p}: there is nothing to compute")
    x, y = (v.reshape(-1) for v in torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"))
    adds = analytic_weights(p, widths[1], seed, len(terms), "add", draw=("experts", len(terms)))
    hidden = 0.0
    for s, ((a, b), c) in enumerate(terms.items()):
        P1, P2, Q = analytic_weights(p, widths[0], seed, 2, "mul", draw=("experts", s))
        powers = [torch.tensor([pow(i, e, p) for i in range(p)]) for e in (a, b)]  # the monomial's inputs x^a, y^b
        t = (P1[powers[0][x]] + P2[powers[1][y]]).square() @ Q  # (p^2, p): x^a y^b mod p
        hidden = hidden + torch.softmax(beta * t, dim=1) @ adds[s][(c * torch.arange(p)) % p]  # reads c_s x^a y^b
    z = hidden ** len(terms) @ adds[-1]
    target = evaluate(node, (x, y), p)
    return {"monomials": terms, "acc": (z.argmax(1) == target).double().mean().item(),
            "mse": (z - torch.nn.functional.one_hot(target, p)).square().mean().item()}


def analytic_grid(p: int, widths: str, seed: int = 0, alpha: float = 0.5, device: str = "cpu", op: str = "add",
                  terms: int = 2):
    """The run's grid (a model per width), its settings and device; bad input, or a model too large for the
    device, raises ConfigError."""
    from fastgrok.backends import TorchBackend
    from fastgrok.config import Grid, Settings
    from fastgrok.device import resolve_device
    from fastgrok.planner import plan

    check_analytic(op, p, terms)
    grid = Grid.parse({"width": widths, "seed": str(seed), "alpha": str(alpha)})
    settings = Settings(op=op, terms=terms, p=p, steps=0, act="quad" if terms == 2 else "pow")
    settings.check(training=False)
    if op == "mul" and min(grid.axes["width"]) < 2:
        raise ConfigError("the analytic solution of mul needs a width of 2 or more (one neuron carries zero)")
    dev = resolve_device(device)
    plan(grid, settings, dev, TorchBackend())
    return grid, settings, dev


def analytic_run(out=None, p: int = 97, widths: str = "500", op: str = "add", seed: int = 0, alpha: float = 0.5,
                 device: str = "cpu", terms: int = 2) -> tuple[list, Path]:
    """Save the analytic solution of `op` on `terms` operands at each width as a run directory (steps 0; `out`,
    or a new runs/<timestamp>) that `ipr` and `prune` accept, with accuracy-vs-width.png for several widths.
    Returns its models.csv rows with `all_acc` (also written to models.csv), the accuracy over all p^S inputs, and
    the directory. Its metrics use the split of a model with this alpha and seed (nothing was trained on it)."""
    from dataclasses import replace

    from fastgrok.analysis import update_models_csv
    from fastgrok.ipr import model_ipr
    from fastgrok.plots import accuracy_vs_width
    from fastgrok.population import Population
    from fastgrok.reference import input_names
    from fastgrok.results import RunWriter, default_out_dir
    from fastgrok.train import model_rows

    grid, settings, dev = analytic_grid(p, widths, seed, alpha, device, op, terms)
    out = default_out_dir() if out is None else Path(out)  # once the input is known good: a refusal leaves nothing
    source = "Gromov 2023, A = (2/N)^(1/3)" if op == "add" and terms == 2 else "Doshi, He, Das, Gromov 2024"
    writer = RunWriter(out, grid, settings, dev, "analytic", extra={"analytic": source})
    rows = []
    for model, h in enumerate(grid.models()):
        pop = Population([h], settings, dev, model_ids=[model])
        for name, w in zip((*input_names(terms), "W"), analytic_weights(p, h.width, h.seed, terms, op)):
            pop.tensors[name].copy_(w[None])
        metrics = pop.evaluate()
        x_all, z_all = pop.table[0], pop.table[1][0]
        pred, _ = pop.family.outputs(pop.tensors, x_all[:, None], z_all[None], settings)
        history = {"model": [model], "step": [0], **{k: [v[0].item()] for k, v in metrics.items()}}
        history["ipr"] = [model_ipr(pop.family, pop.tensors, settings)[0].item()]
        row = model_rows(pop, metrics, history)[0]
        writer.add_population([row], history, pop.weights())
        rows.append(replace(row, extra={"all_acc": (pred[0] == z_all).double().mean().item()}))
    writer.finish("complete")
    update_models_csv(out, {"all_acc": {r.model: r["all_acc"] for r in rows}})
    if len(rows) > 1:
        accuracy_vs_width({"": ([r["width"] for r in rows], [r["all_acc"] for r in rows])}, out / "accuracy-vs-width.png",
                          f"analytic solution of {op}" + (f" of {terms} terms" if terms != 2 else "") + f", p {p}")
    return rows, out
