"""Backends: one training step for a whole population, and the evaluation forward.

`torch` is batched PyTorch and runs every family: a step is the family's grads (fastgrok.families; the MLP's has
its backward written out, the structure its Triton kernels share), then the optimizer. Fused backends run the
families that have kernels of their own (Family.fused: the MLP's `triton`, fastgrok.families.mlp_triton).

A model whose loss or gradients are not finite is flagged `diverged` and frozen; its neighbours never see it.
Every backend states the working memory of its step (step_bytes) and of evaluation per example (eval_bytes) for
the memory planner (fastgrok.planner).
"""

from __future__ import annotations

import math

import torch

from fastgrok import optim
from fastgrok.config import DEFAULT_PRECISION, PRECISIONS
from fastgrok.errors import ConfigError
from fastgrok.families import family_of
from fastgrok.population import Population

# On a CPU the step is bound by memory traffic, not arithmetic: the torch backend works through a population in
# pieces whose (examples, N) activations take at most this many bytes, so that the few such tensors a pass holds
# stay in the last-level cache: chunks of models, and a model whose own activations are larger in spans of its
# examples (their losses and gradients summed); spans also bound the memory of one wide model. bench/torch_knobs.py
# times sizes side by side; on the 2-core AMD EPYC development machine (32 MB L3, 2026-11-23,
# bench/results/cpu-2core-chunks.json) 4 MiB against 24 MiB: the cpu-demo population 1.95x (1,012 against 519
# model-steps/s), 16 models of p 97, N 128 2.18x, 16 of N 500 1.23x, one model of N 500 (in spans) 1.03x. With
# fastgrok.process's malloc settings (cpu-2core-chunks-malloc.json) 4 MiB is the fastest size or within 8% of it in
# every case (p 97, N 128, 16 models: 143 against 24 MiB's 154 model-steps/s).
CPU_CHUNK_BYTES = 4 << 20


def cpu_pieces(family, settings, width: int, d: int) -> tuple[int, int]:
    """The pieces a CPU step of the torch backend goes through: chunks of this many models, each in spans of
    this many examples (d: the step's examples of the population's largest model)."""
    row, budget = family.row_bytes(settings, width), CPU_CHUNK_BYTES * family.cpu_piece_scale
    chunk = max(1, budget // (row * d))
    span = d if family.whole_batch(settings) else max(16, budget // row)
    return chunk, span


def finite_models(t: torch.Tensor) -> torch.Tensor:
    """(B,) whether each model's slice of t (B, ...) holds no NaN or inf. Its largest |x| is finite exactly
    then (the max carries NaN and inf through): one read of t, where isfinite(t).all() writes a mask as
    large as t and reads it again (1.2 of 27.9 ms of an H100 step at N 512, docs/performance.md)."""
    return torch.isfinite(torch.linalg.vector_norm(t.flatten(1), ord=float("inf"), dim=1))


def finish_step(pop: Population, losses: torch.Tensor, grads, update) -> torch.Tensor:
    """Freeze every model whose loss or gradients are not finite (for good), then let `update` (an optimizer
    step with fastgrok.optim.step_'s signature) move the others."""
    ok = torch.isfinite(losses)
    for g in grads:
        ok &= finite_models(g)
    pop.diverged |= ~ok
    pop.step += 1
    update(pop.settings.optimizer, pop.optimized, grads, pop.exp_avg, pop.exp_avg_sq, pop.step, pop.lr, pop.wd,
           pop.beta1, pop.beta2, pop.eps, active=~pop.diverged, decay=pop.decays)
    return losses


class TorchBackend:
    """Batched PyTorch, every family. compile=True wraps the family's grads in torch.compile (GPU benchmarks)."""

    name = "torch"
    precision = None

    def __init__(self, compile: bool = False):
        if compile:
            # One static graph per population shape; a benchmark visits a dozen shapes, and past dynamo's default
            # of 8 recompiles it would silently fall back to eager for the rest.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compile = compile
        self._compiled = {}

    def refusal(self, settings) -> str | None:
        """Why this backend cannot run `settings`, or None: it runs every family at any p."""
        return None

    def check(self, settings) -> None:
        if (why := self.refusal(settings)) is not None:
            raise ConfigError(why)

    def _grads(self, family):
        if not self.compile:
            return family.grads
        if family.name not in self._compiled:
            self._compiled[family.name] = torch.compile(family.grads, dynamic=False)
        return self._compiled[family.name]

    def step(self, pop: Population) -> torch.Tensor:
        """One step for every model; returns the (B,) training losses before the update."""
        s, family = pop.settings, pop.family
        grads = self._grads(family)
        x, y, valid, D = pop.batch()
        B, d_max = y.shape
        counts = pop.batch_counts
        chunk, span = cpu_pieces(family, s, pop.width, d_max) if pop.device.type == "cpu" else (B, d_max)
        results = None
        for lo in range(0, B, chunk):
            # a chunk's examples stop at its largest training set (with alpha varying, the padding of small
            # training sets up to the population's largest would be most of the work); its dropout masks are
            # drawn here, never (B, Dmax, N) at once
            sl, d = slice(lo, lo + chunk), int(counts[lo : lo + chunk].max())
            part_tensors = {name: t[sl] for name, t in pop.tensors.items()}
            masks = pop.dropout_masks(sl, d)
            part = None
            for start in range(0, d, span):  # losses (means over D, not over the span) and gradients add up
                ex = (sl, slice(start, min(start + span, d)))
                terms = grads(part_tensors, x[(slice(None), *ex)], y[ex], valid[ex], D[sl],
                              None if masks is None else masks[:, ex[1]], s)
                part = terms if part is None else [a.add_(t) for a, t in zip(part, terms)]
            if chunk >= B:
                results = part
            else:  # into the population's tensors as they come, never a second copy of every gradient
                results = results or [t.new_empty((B, *t.shape[1:])) for t in part]
                for whole, t in zip(results, part):
                    whole[sl] = t
        losses, *rest = results
        trained = len(pop.optimized)
        losses = finish_step(pop, losses, rest[:trained], optim.step_)
        family.after_step(pop.tensors, rest[trained:], pop.diverged)
        return losses

    def outputs(self, t, x, y, settings):
        """Predictions and per-example losses of a chunk of models (Population.evaluate)."""
        return family_of(settings).outputs(t, x, y, settings)

    def eval_bytes(self, settings, width: int) -> int:
        return family_of(settings).eval_bytes(settings, width)

    def step_bytes(self, settings, width: int, d: int, models: int, device: torch.device, dropout: bool) -> int:
        """Working memory of a step of `models` models on d examples each. On a GPU every model's at once; on a
        CPU one piece of the population at a time (cpu_pieces): that piece's activations, its gradients and their
        sum over spans, and its models' dropout masks (whole training sets)."""
        family = family_of(settings)
        if device.type != "cpu":
            return models * family.step_bytes(settings, width, d)
        chunk, span = cpu_pieces(family, settings, width, d)
        held = min(models, chunk)
        trained = 4 * sum(math.prod(spec.shape) for spec in family.tensors(settings, width).values() if spec.trained)
        masks = 4 * held * d * family.dropout_units(settings, width) if dropout else 0
        return family.step_bytes(settings, width, held * min(d, span)) + 2 * held * trained + masks


BACKENDS = ("auto", "torch", "triton")


def make_backend(name: str, device: torch.device, precision: str | None = None, settings=None):
    """A backend for the family of `settings` (default Settings(): the MLP) on `device`. 'auto': the family's
    fused kernels on a CUDA device where they run these settings, batched PyTorch elsewhere. precision (fused
    backends only): None is DEFAULT_PRECISION."""
    from fastgrok.config import Settings

    settings = Settings() if settings is None else settings
    precision = DEFAULT_PRECISION if precision is None else precision
    check_precision(precision)  # also where the torch backend ignores it: a typo is refused on every machine
    fused = family_of(settings).fused  # name -> class with unavailable(device), refusal(settings), (precision)
    if name == "auto":
        runs = [k for k, cls in fused.items() if cls.unavailable(device) is None and cls.refusal(settings) is None]
        name = runs[0] if device.type == "cuda" and runs else "torch"
    if name == "torch":
        return TorchBackend()
    if name in fused:
        if (why := fused[name].unavailable(device)) is not None:
            raise ConfigError(why)
        return fused[name](precision)
    if name in BACKENDS:
        raise ConfigError(f"the {settings.model} model has no {name} backend; use --backend torch")
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
