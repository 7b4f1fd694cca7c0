"""Backends: one training step for a whole population, and the evaluation forward.

`torch` is batched PyTorch and runs every family: a step is the family's grads (fastgrok.families; the MLP's has
its backward written out, the structure its Triton kernels share), then the optimizer. Fused backends run the
families that have kernels of their own (Family.fused: the MLP's `triton`).

A model whose loss or gradients are not finite is flagged `diverged` and frozen; its neighbours never see it.
Every backend states the working memory of its step (step_bytes) and of evaluation per example (eval_bytes) for
the memory planner (fastgrok.planner).
"""

from __future__ import annotations

import math
import os

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
    row = family.row_bytes(settings, width)
    chunk = max(1, CPU_CHUNK_BYTES // (row * d))
    span = d if family.whole_batch(settings) else max(16, CPU_CHUNK_BYTES // row)
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
           pop.beta1, pop.beta2, pop.eps, active=~pop.diverged)
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
        m, n, y, valid, D = pop.batch()
        B, d_max = m.shape
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
                terms = grads(part_tensors, m[ex], n[ex], y[ex], valid[ex], D[sl],
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

    def outputs(self, t, m, n, y, settings):
        """Predictions and per-example losses of a chunk of models (Population.evaluate)."""
        return family_of(settings).outputs(t, m, n, y, settings)

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


class TritonBackend:
    """Fused Triton kernels (fastgrok.kernels): forward + loss gradient, backward, optimizer, evaluation.

    precision: fp32 (IEEE products, exact parity with the reference), tf32, tf32x3 or bf16 dot inputs; parameters,
    gradients and Adam moments stay fp32 in every mode. Runs on a CPU under TRITON_INTERPRET=1 (slow)."""

    name = "triton"

    def __init__(self, precision: str = "fp32", fused: bool | None = None, scatter: str = "window",
                 forward_tiles: dict | None = None, backward_tiles: dict | None = None):
        from fastgrok.kernels import backward, forward
        from fastgrok.kernels.backward import SCATTERS

        check_precision(precision)
        if scatter not in SCATTERS:
            raise ConfigError(f"unknown scatter {scatter!r}; choose one of {', '.join(SCATTERS)}")
        # fused (one backward launch for dW, dU, dV) and the backward's tiles default per precision to what the
        # GPU measured fastest (kernels/backward.py STEP; BLOCK_STEP for the block scatter, not yet measured)
        default_fused, default_tiles = backward.default_step(precision, scatter)
        self.precision, self.scatter = precision, scatter
        self.fused = default_fused if fused is None else fused
        # scatter "window" (default) executes about 6.6 D N P FLOPs a step against one-hot dots' 10 D N P and
        # beat them at every tile on an H100 (kernels/backward.py, bench/NOTES.md); "block" is its
        # software-pipelined successor, to be measured against it (bench/sweep_blocks.py).
        # Tiles ({block_d, block_n, num_warps}) of the forward/evaluation and backward kernels: the defaults are
        # the fastest the H100 sweep found (kernels/*.py TILES, backward.STEP).
        self.forward_tiles = {**forward.TILES, **(forward_tiles or {})}
        self.backward_tiles = {**default_tiles, **(backward_tiles or {})}
        self.name = f"triton-{precision}" + ("-block" if scatter == "block" else "")

    # p is padded to a power of two inside the kernels, and above 128 the launchers shrink the tiles with it
    # (kernels/forward.py fit) so that they fit an SM's shared memory: checked at compile time up to P 512
    # (bench/kernel_resources.py --check, run by the tests); past it the tiles would go below the dots' 16 rows.
    MAX_P = 512

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why the kernels cannot run on `device`, or None."""
        if not _has_triton():
            return "--backend triton needs the triton package (pip install triton)"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "--backend triton on a CPU runs only under TRITON_INTERPRET=1 (slow; for tests and debugging)"
        return None

    @classmethod
    def refusal(cls, settings) -> str | None:
        """Why the kernels cannot run `settings`, or None."""
        if settings.batchnorm:
            return "BatchNorm runs on --backend torch (the fused kernels have no BatchNorm)"
        if settings.p > cls.MAX_P:
            return f"the triton backend handles p up to {cls.MAX_P}; use --backend torch for p {settings.p}"
        return None

    def check(self, settings) -> None:
        if (why := self.refusal(settings)) is not None:
            raise ConfigError(why)

    def step_data(self, pop: Population) -> dict:
        """What the kernels need for pop's next step: its examples as int32 copies (made once per population for
        full-batch training, every step for minibatches) and its dropout masks ("masks": kernels/dropout.py, drawn
        for this step; None without dropout).

        The kernels see each model's examples in tile order (kernels.backward.tile_order, or block_order for the
        "block" scatter): a step does not depend on the order beyond rounding, the windowed scatter needs it to
        be cheap and the block scatter to be right."""
        from fastgrok.kernels.backward import block_order, tile_order
        from fastgrok.kernels.dropout import masks

        cached = getattr(pop, "_triton_data", None)
        if cached is None:
            dev = pop.device
            rates = pop.dropout.double()
            dropout = None
            if bool((rates > 0).any()):
                threshold = torch.clamp(torch.round(rates * 2.0**32), max=2.0**32 - 1).long()
                dropout = (pop.dropout_seed.to(dev), threshold.to(dev), (1.0 / (1.0 - rates)).float().to(dev))
            cached = pop._triton_data = {"dropout": dropout}
        kind = "block" if self.scatter == "block" else "tile"  # the order the kernels need (cached per kind)
        if kind not in cached:
            m, n, y, valid, D = pop.batch()
            if kind == "block":
                perm, blocks = block_order(m, n, valid, pop.settings.p)
            else:
                perm, blocks = tile_order(m, n, valid, pop.settings.p), None
            m, n, y = (torch.gather(t, 1, perm).int() for t in (m, n, y))
            examples = {"m": m, "n": n, "y": y, "blocks": blocks, "valid": valid, "count": D.int(), "D": D}
            if pop.batch_size is None:
                cached[kind] = examples
        else:
            examples = cached[kind]
        drawn = masks(examples["m"], examples["n"], examples["count"], cached["dropout"], p=pop.settings.p,
                      width=pop.width, step=pop.step)
        return {**examples, "masks": drawn}

    def step(self, pop: Population) -> torch.Tensor:
        from fastgrok.kernels.optimizer import optimizer_step_

        data = self.step_data(pop)
        example_loss, G = self.forward(pop, data)
        # padding comes last in tile order too, so `valid` masks the kernel's slots as well as the batch's
        losses = torch.where(data["valid"], example_loss, 0.0).sum(1) / data["D"]
        return finish_step(pop, losses, self.backward(pop, data, G), optimizer_step_)

    def forward(self, pop: Population, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward kernel: per-example losses and the output gradient G, in the kernels' slot order
        (with the "block" scatter the forward walks the same blocks, reading U, V rows from a window per block)."""
        from fastgrok.kernels.forward import forward
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        s = pop.settings
        example_loss, G, _ = forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"], act=ACT_CODES[s.act],
                                     loss=LOSS_CODES[s.loss], precision=self.precision, train=True,
                                     dropout=data["masks"], blocks=data["blocks"], **self.forward_tiles)
        return example_loss, G

    def backward(self, pop: Population, data: dict, G: torch.Tensor):
        """The step's backward kernel(s): dU, dV, dW (fp32)."""
        from fastgrok.kernels.backward import backward
        from fastgrok.kernels.hidden import ACT_CODES

        return backward(pop.U, pop.V, pop.W, data["m"], data["n"], data["count"], G, act=ACT_CODES[pop.settings.act],
                        precision=self.precision, dropout=data["masks"], fused=self.fused,
                        scatter=self.scatter, blocks=data["blocks"], **self.backward_tiles)

    def eval_bytes(self, settings, width: int) -> int:
        """Per example: int64 indices and labels built by Population.evaluate, their int32 copies, pred and loss."""
        return 6 * 8 + 3 * 4 + 8 + 4

    def step_bytes(self, settings, width: int, d: int, models: int, device: torch.device, dropout: bool) -> int:
        """Per model: G (d p', rows padded to 16 bytes), per-example losses and int32 copies of the indices in tile
        order (4 d), the forward's transposed copy of W (p N', N' = N padded to 16); G and that copy are fp32,
        bf16 in bf16, and with dropout the step's mask bits (4 bytes per 32 neurons of an example,
        kernels/dropout.py); nothing of size d N is ever stored."""
        p, size = settings.p, 2 if self.precision == "bf16" else 4
        g_row, w_row = -(-p * size // 16) * 16 // size, -(-width // 16) * 16
        work = 4 * 4 * d + size * (d * g_row + p * w_row)
        if dropout:
            work += 4 * -(-width // 32) * d
        return models * work

    def outputs(self, t, m, n, y, settings):
        """The evaluation kernel: predictions and per-example losses for a chunk of models (all examples valid)."""
        from fastgrok.kernels.forward import forward
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        U, V, W = t["U"], t["V"], t["W"]
        count = torch.full((U.shape[0],), m.shape[1], dtype=torch.int32, device=U.device)
        losses, _, pred = forward(U.contiguous(), V.contiguous(), W, m.int().contiguous(),
                                  n.int().contiguous(), y.int().contiguous(), count, act=ACT_CODES[settings.act],
                                  loss=LOSS_CODES[settings.loss], precision=self.precision, train=False,
                                  **self.forward_tiles)
        return pred.long(), losses


BACKENDS = ("auto", "torch", "triton")


def make_backend(name: str, device: torch.device, precision: str | None = None, settings=None):
    """A backend for the family of `settings` (default Settings(): the MLP) on `device`. 'auto': the family's
    fused kernels on a CUDA device where they run these settings, batched PyTorch elsewhere. precision (fused
    backends only): None is DEFAULT_PRECISION."""
    from fastgrok.config import Settings

    settings = Settings() if settings is None else settings
    precision = DEFAULT_PRECISION if precision is None else precision
    check_precision(precision)  # also where the torch backend ignores it: a typo is refused on every machine
    fused = family_of(settings).fused
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


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
