"""The one-hot MLP's fused backend: its Triton kernels (fastgrok.kernels) run a population's step and evaluation.

    step_data   each model's examples as int32 copies in the kernels' order (tile_order) and the step's dropout
                mask bits (kernels/dropout.py)
    forward     per-example losses and the output gradient G (kernels/forward.py)
    backward    dU, dV, dW (kernels/backward.py)
    optimizer   AdamW, Adam or SGD in place, frozen models untouched (kernels/optimizer.py)

precision: fp32 (IEEE products, exact parity with the reference), tf32, tf32x3 or bf16 dot inputs; parameters,
gradients and Adam moments stay fp32 in every mode. Runs on a CPU under TRITON_INTERPRET=1 (slow; the tests).
"""

from __future__ import annotations

import os
import weakref

import torch

from fastgrok.backends import check_precision, finish_step
from fastgrok.errors import ConfigError
from fastgrok.kernels import layout  # imports no triton: the planner asks for bytes on any machine


class TritonBackend:
    name = "triton"

    # p is padded to a power of two inside the kernels, and above 128 the launchers shrink the tiles with it
    # (kernels/layout.py fit) so that they fit an SM's shared memory: checked at compile time up to P 512
    # (bench/kernel_resources.py --check, run by the tests); past it the tiles would go below the dots' 16 rows.
    MAX_P = 512

    def __init__(self, precision: str = "fp32", fused: bool | None = None, forward_tiles: dict | None = None,
                 backward_tiles: dict | None = None):
        from fastgrok.kernels import forward

        check_precision(precision)
        # fused (one backward launch for dW, dU, dV) and the backward's tiles default per precision to what the
        # GPU measured fastest (kernels/backward.py STEP)
        default_fused, default_tiles = self.default_step(precision)
        self.precision = precision
        self.fused = default_fused if fused is None else fused
        # Tiles ({block_d, block_n, num_warps}) of the forward/evaluation and backward kernels: the defaults are
        # the fastest the H100 sweep found (kernels/*.py TILES, backward.STEP).
        self.forward_tiles = {**forward.TILES, **(forward_tiles or {})}
        self.backward_tiles = {**default_tiles, **(backward_tiles or {})}
        self.name = f"triton-{precision}"
        # per population: its dropout constants, and its examples in the kernels' order for full-batch training
        self._data = weakref.WeakKeyDictionary()

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why the kernels cannot run on `device`, or None."""
        try:
            import triton  # noqa: F401
        except ImportError:
            return "--backend triton needs the triton package (pip install triton)"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "--backend triton on a CPU runs only under TRITON_INTERPRET=1 (slow; for tests and debugging)"
        return None

    @classmethod
    def refusal(cls, settings) -> str | None:
        """Why the kernels cannot run `settings`, or None."""
        if settings.batchnorm:
            return "BatchNorm runs on --backend torch (the fused kernels have no BatchNorm)"
        if settings.terms != 2 or settings.act not in ("quad", "relu"):
            return ("the fused kernels take two operands and --act quad or relu; --terms and --act pow run on "
                    "--backend torch")
        if settings.p > cls.MAX_P:
            return f"the triton backend handles p up to {cls.MAX_P}; use --backend torch for p {settings.p}"
        return None

    def check(self, settings) -> None:
        if (why := self.refusal(settings)) is not None:
            raise ConfigError(why)

    @staticmethod
    def default_step(precision: str) -> tuple[bool, dict]:
        """(fused, tiles) of the backward at `precision` unless told otherwise."""
        from fastgrok.kernels.backward import default_step

        return default_step(precision)

    @staticmethod
    def example_order(m, n, valid, p: int) -> tuple[torch.Tensor, dict]:
        """The order in which the kernels see each model's examples, (B, Dmax) permutations of its slots, and what
        else the kernels need of it (here nothing): tile_order, which a step does not depend on beyond rounding
        and which makes the windowed scatter cheap (kernels/backward.py)."""
        from fastgrok.kernels.backward import tile_order

        return tile_order(m, n, valid, p), {}

    def step_data(self, pop) -> dict:
        """What the kernels need for pop's next step: its examples as int32 copies in example_order (made once per
        population for full-batch training, every step for minibatches) and its dropout masks ("masks":
        kernels/dropout.py, drawn for this step; None without dropout)."""
        from fastgrok.kernels.dropout import masks

        cached = self._data.get(pop)
        if cached is None:
            dev = pop.device
            rates = pop.dropout.double()
            dropout = None
            if bool((rates > 0).any()):
                threshold = torch.clamp(torch.round(rates * 2.0**32), max=2.0**32 - 1).long()
                dropout = (pop.dropout_seed.to(dev), threshold.to(dev), (1.0 / (1.0 - rates)).float().to(dev))
            cached = self._data[pop] = {"dropout": dropout}
        examples = cached.get("examples")
        if examples is None:
            (m, n), y, valid, D = pop.batch()
            perm, extra = self.example_order(m, n, valid, pop.settings.p)
            m, n, y = (torch.gather(t, 1, perm).int() for t in (m, n, y))
            examples = {"m": m, "n": n, "y": y, "valid": valid, "count": D.int(), "D": D, **extra}
            if pop.batch_size is None:
                cached["examples"] = examples
        drawn = masks(examples["m"], examples["n"], examples["count"], cached["dropout"], p=pop.settings.p,
                      width=pop.width, step=pop.step)
        return {**examples, "masks": drawn}

    def step(self, pop) -> torch.Tensor:
        from fastgrok.kernels.optimizer import optimizer_step_

        data = self.step_data(pop)
        example_loss, G = self.forward(pop, data)
        # padding comes last in the kernels' order too, so `valid` masks the kernel's slots as well as the batch's
        losses = torch.where(data["valid"], example_loss, 0.0).sum(1) / data["D"]
        return finish_step(pop, losses, self.backward(pop, data, G), optimizer_step_)

    def forward(self, pop, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward kernel: per-example losses and the output gradient G, in the kernels' slot order."""
        from fastgrok.kernels.forward import forward
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        s = pop.settings
        example_loss, G, _ = forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"],
                                     act=ACT_CODES[s.act], loss=LOSS_CODES[s.loss], precision=self.precision,
                                     train=True, dropout=data["masks"], **self.forward_tiles)
        return example_loss, G

    def backward(self, pop, data: dict, G: torch.Tensor):
        """The step's backward kernel(s): dU, dV, dW (fp32)."""
        from fastgrok.kernels.backward import backward
        from fastgrok.kernels.hidden import ACT_CODES

        return backward(pop.U, pop.V, pop.W, data["m"], data["n"], data["count"], G, act=ACT_CODES[pop.settings.act],
                        precision=self.precision, dropout=data["masks"], fused=self.fused, **self.backward_tiles)

    def step_bytes(self, settings, width: int, d: int, models: int, device: torch.device, dropout: bool) -> int:
        """Working memory of a step of `models` models on d examples each (kernels/layout.py step_bytes)."""
        return models * layout.step_bytes(settings.p, width, d, self.precision, dropout)

    def eval_bytes(self, settings, width: int) -> int:
        """Working memory per example of `outputs` (kernels/layout.py eval_bytes)."""
        return layout.eval_bytes(width, settings.p)

    def outputs(self, t, x, y, settings):
        """The evaluation kernel: predictions and per-example losses for a chunk of models (all examples valid)."""
        from fastgrok.kernels.forward import forward
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        U, V, W = t["U"], t["V"], t["W"]
        m, n = x
        count = torch.full((U.shape[0],), m.shape[1], dtype=torch.int32, device=U.device)
        losses, _, pred = forward(U.contiguous(), V.contiguous(), W, m.int().contiguous(),
                                  n.int().contiguous(), y.int().contiguous(), count, act=ACT_CODES[settings.act],
                                  loss=LOSS_CODES[settings.loss], precision=self.precision, train=False,
                                  **self.forward_tiles)
        return pred.long(), losses
