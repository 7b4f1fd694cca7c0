"""Modular-arithmetic tasks, train/test splits and label corruption, as index tensors.

A task is every valid pair (m, n) of residues mod p with its label z = (m op n) mod p: a named op (OPS) or any
polynomial in x = m, y = n (fastgrok.polynomials); on S operands (--terms S) every tuple (x1..xS), labelled by
their sum (add), product (mul) or a polynomial in x1..xS. A model's data is
that table shuffled with its split seed: the first int(alpha * P) pairs train, the rest test (P = number of
pairs). Its first int(xi * D) training examples have their labels replaced (paper: drawn uniformly from all
p labels, so a drawn label equals the true one with probability 1/p). Labels are drawn for all D training
examples from the noise seed before the first int(xi * D) are used, so for one split and noise seed the
corrupted sets are nested across xi. Test labels are never corrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastgrok.errors import ConfigError

OPS = {
    "add": "x + y",
    "sub": "x - y",
    "mul": "x * y",
    "div": "x / y (y != 0, p prime)",
    "x2y2": "x^2 + y^2",
    "x2xyy2": "x^2 + x y + y^2",
}
# the named ops as polynomials (fastgrok.polynomials); div is not one: it leaves out the pairs with y = 0
POLYNOMIALS = {"add": "x+y", "sub": "x-y", "mul": "x*y", "x2y2": "x^2+y^2", "x2xyy2": "x^2+x*y+y^2"}
NOISES = {
    "uniform": "labels drawn uniformly from all p (the paper's)",
    "wrong": "labels drawn uniformly from the p - 1 wrong ones",
}


def is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p**0.5) + 1))


MAX_TERMS = 8


def polynomial_of(op: str, terms: int) -> str | None:
    """The polynomial a named op stands for on `terms` operands (None for div and for a polynomial given as
    such): add and mul of any number of operands, the others of two."""
    if op == "add" and terms != 2:
        return "+".join(f"x{k}" for k in range(1, terms + 1))
    if op == "mul" and terms != 2:
        return "*".join(f"x{k}" for k in range(1, terms + 1))
    if op in OPS and terms != 2:
        raise ConfigError(f"--op {op} takes 2 operands; with --terms {terms} give add, mul or a polynomial in "
                          f"x1..x{terms}")
    return POLYNOMIALS.get(op)


def check_terms(terms: int) -> None:
    if not 2 <= terms <= MAX_TERMS:
        raise ConfigError(f"--terms must be between 2 and {MAX_TERMS}, got {terms}")


def check_task(op: str, p: int, terms: int = 2) -> None:
    """A named op (OPS) or a polynomial in x, y (x1..xS; fastgrok.polynomials) defined on every input mod p."""
    if p < 2:
        raise ConfigError(f"p must be at least 2, got {p}")
    check_terms(terms)
    if op == "div" and not is_prime(p):
        raise ConfigError(f"div needs a prime p (every nonzero n invertible); {p} is not prime")
    if op == "div" and terms != 2:
        raise ConfigError(f"--op div takes 2 operands, got --terms {terms}")
    if op != "div" and (op not in OPS or terms != 2):
        from fastgrok import polynomials

        if polynomials.has_division(_polynomial(op, p, terms)):
            task_table(op, p, terms)  # on every input: a divisor that is 0 somewhere is refused


def pair_count(op: str, p: int, terms: int = 2) -> int:
    """The number of valid inputs of a task, without building its table: p^S, or p (p - 1) for div."""
    check_task(op, p, terms)
    return p * (p - 1) if op == "div" else p**terms


def _operands(p: int, terms: int) -> torch.Tensor:
    """Every tuple of `terms` residues mod p in canonical order (the first operand major): (S, p^S)."""
    grids = torch.meshgrid(*[torch.arange(p)] * terms, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids])


def _polynomial(op: str, p: int, terms: int):
    """The expression tree of a named op or a polynomial (fastgrok.polynomials), checked against p."""
    from fastgrok import polynomials

    if op not in OPS and not any(c in op for c in "xy0123456789"):
        raise ConfigError(f"unknown op {op!r}; choose one of {', '.join(OPS)}, or give a polynomial in x, y such as "
                          "x^2+y^2")
    tree = polynomials.parse(polynomial_of(op, terms) or op, terms)
    if polynomials.has_division(tree) and not is_prime(p):
        raise ConfigError(f"--op {op!r} divides, which needs a prime p (every nonzero residue invertible); {p} is "
                          "not prime")
    return tree


def task_table(op: str, p: int, terms: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """All valid inputs in canonical order (the first operand major): their residues x (S, P) and labels z (P,),
    int64."""
    if p < 2:
        raise ConfigError(f"p must be at least 2, got {p}")
    check_terms(terms)
    x = _operands(p, terms)
    if op == "div":
        if terms != 2:
            raise ConfigError(f"--op div takes 2 operands, got --terms {terms}")
        if not is_prime(p):
            raise ConfigError(f"div needs a prime p (every nonzero n invertible); {p} is not prime")
        x = x[:, x[1] != 0]
        from fastgrok.polynomials import inverses

        return x, x[0] * inverses(p)[x[1]] % p
    from fastgrok import polynomials

    return x, polynomials.evaluate(_polynomial(op, p, terms), tuple(x), p)


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for one named random stream of a model (split, noise, init, dropout, batches), and for
    numbered sub-streams of it (the batches of each epoch): independent streams."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, tag, *index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, stream: str, *index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, *index))


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """Minibatch training: the order (a permutation of the training slots 0..size-1) in which a model of this seed
    visits its training set in `epoch`. Batches are consecutive runs of batch_size slots of it; the remainder
    of an epoch is dropped, so every batch is full (BatchNorm needs two examples or more)."""
    return torch.randperm(size, generator=generator(seed, "batches", epoch))


def batch_slots(seed: int, size: int, batch_size: int, step: int) -> torch.Tensor:
    """The training slots a model (seed, `size` training examples) trains on at `step` (counting from 0)."""
    per_epoch = size // batch_size
    first = (step % per_epoch) * batch_size
    return epoch_order(seed, step // per_epoch, size)[first : first + batch_size]


def train_size(num_pairs: int, alpha: float) -> int:
    return int(alpha * num_pairs)


def checked_train_size(num_pairs: int, alpha: float) -> int:
    """train_size, or a ConfigError when it leaves no training or no test pair."""
    d = train_size(num_pairs, alpha)
    if d < 1 or d >= num_pairs:
        raise ConfigError(f"alpha {alpha} leaves {d} of {num_pairs} pairs for training: need at least one train and one test pair")
    return d


def check_training_sets(alphas, settings) -> None:
    """Every alpha leaves at least one training and one test pair, and its training set holds at least one
    batch: checked before a run writes anything."""
    num_pairs = pair_count(settings.op, settings.p, settings.terms)
    for alpha in sorted(set(alphas)):
        d = checked_train_size(num_pairs, alpha)
        if settings.batch_size is not None and d < settings.batch_size:
            raise ConfigError(f"--batch-size {settings.batch_size} is larger than the training set of alpha "
                              f"{alpha:g} ({d} examples)")


def check_grid(grid, settings) -> None:
    """Every task of the grid (its op axis, or the settings' op) defined mod p on its operands, and every alpha
    leaving a training and a test set of each (check_training_sets)."""
    for op in grid.axes["op"]:
        task = settings.with_op(op)
        check_task(task.op, task.p, task.terms)
        check_training_sets(grid.axes["alpha"], task)


def corrupted_count(train_size: int, xi: float) -> int:
    return int(xi * train_size)


@dataclass(frozen=True)
class Split:
    """One model's data. perm: (P,) pair indices, training pairs first; labels: (D,) training labels as
    trained on (the first n_corrupt of them replaced)."""

    perm: torch.Tensor
    labels: torch.Tensor
    n_corrupt: int

    @property
    def size(self) -> int:
        return self.labels.numel()


def make_split(z: torch.Tensor, p: int, alpha: float, xi: float, split_seed: int, noise_seed: int,
               noise: str = "uniform") -> Split:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha (train fraction) must be in (0, 1), got {alpha}")
    if not 0.0 <= xi <= 1.0:
        raise ConfigError(f"xi (corrupted fraction) must be in [0, 1], got {xi}")
    if noise not in NOISES:
        raise ConfigError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")
    num_pairs = z.numel()
    d = checked_train_size(num_pairs, alpha)
    perm = torch.randperm(num_pairs, generator=generator(split_seed, "split"))
    labels = z[perm[:d]].clone()
    c = corrupted_count(d, xi)
    g = generator(noise_seed, "noise")
    if noise == "uniform":
        drawn = torch.randint(0, p, (d,), generator=g)
    else:
        drawn = (labels + torch.randint(1, p, (d,), generator=g)) % p
    labels[:c] = drawn[:c]
    return Split(perm=perm, labels=labels, n_corrupt=c)
