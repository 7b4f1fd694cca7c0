"""Model families: each kind of model a population can hold, described in one place.

A family says what its models are made of and how they compute. Everything generic (Population, the torch
backend's step, the memory planner, the run directory, IPR and pruning) asks the family instead of naming a
model's tensors, so a new family is one file here (plus its kernels, if it has any) and its tests:

    tensors(settings, width)        one model's tensors: name -> Spec(shape, trained, fill), in a fixed order;
                                    a population stacks each as (B, *shape), and saves them under these names
    init(settings, width, g)        one model's drawn tensors, from its own init generator (the rest: Spec.fill)
    forward(t, x, settings)         batched evaluation: the logits (B, D, p) of the models whose tensors are t, on
                                    the examples whose operands are x (S, B, D): x[0] = m, x[1] = n
    grads(t, batch..., settings)    the torch backend's step: losses and gradients (default: autograd of
                                    train_forward, which is forward unless the family has batch statistics)
    reference(settings, hyper, t)   one model as the plain nn.Module of fastgrok.reference
    ipr_parts(t), prune(t, keep)    the weight vectors over the p residues whose IPR describes each unit, and the
                                    tensors with some units dropped
    ipr_extra(t)                    other weight vectors over the p residues whose mean IPR a model reports
    bn_pairs(t)                     with BatchNorm: units' weight vectors and the BatchNorm weights of the same
                                    units, whose rank correlation a model reports
    step_bytes, eval_bytes, row_bytes   working memory of a torch step, of evaluation per example, and of one
                                    example's widest activation row (the memory planner and CPU chunking);
                                    cpu_piece_scale: the CPU pieces' size, as a multiple of the MLP's
    fused                           the backends with kernels of its own: name -> a class taking the precision
    check, check_widths, acts, options, defaults
                                    the settings it refuses, the activations it takes, the Settings fields that
                                    are its own (another family's is refused), what the command line gives it

A family is looked up by Settings.model in FAMILIES: the paper's one-hot MLP (fastgrok.families.mlp, with Triton
kernels), its deeper ReLU MLP (deep_mlp) and the authors' encoder-only transformer (transformer). The math of each
family lives in fastgrok.reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastgrok import reference
from fastgrok.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fastgrok.config import Hyper, Settings


@dataclass(frozen=True)
class Spec:
    """One tensor of a model: its shape, whether the optimizer trains it (else it is a buffer, saved with the
    weights but never updated by a gradient: BatchNorm's running statistics), the constant it starts at when the
    family's init does not draw it, and whether weight decay applies to it."""

    shape: tuple[int, ...]
    trained: bool = True
    fill: float | None = None
    decay: bool = True  # weight decay applies to it (not to a LayerNorm's weight and bias)


class Family:
    """The interface, with the parts most families share written once. Subclasses set `name` and `about` and
    define tensors, init, forward, reference, ipr_parts and prune; grads defaults to autograd through forward."""

    name: str = ""
    about: str = ""
    fused: dict = {}  # backend name -> class(precision), for families with kernels of their own
    acts: tuple[str, ...] = ("relu", "gelu")  # the activations it takes
    defaults: dict = {"act": "relu"}  # the settings the command line gives it unless told otherwise
    options: tuple[str, ...] = ()  # the Settings fields that are its own (--depth, --heads, ...)
    takes_batchnorm: bool = False  # whether --batchnorm means something for it
    cpu_piece_scale: int = 1  # its CPU step's pieces are this many times backends.CPU_CHUNK_BYTES (measured)

    def check(self, settings: Settings) -> None:
        """Refuse settings the family cannot take, with a ConfigError that says why."""
        if settings.terms != 2:
            raise ConfigError(f"the {self.name} model takes 2 operands; --terms {settings.terms} is the mlp model's")
        if settings.act not in self.acts:
            raise ConfigError(f"the {self.name} model takes --act {' or '.join(self.acts)}, got {settings.act!r}")
        if settings.batchnorm and not self.takes_batchnorm:
            raise ConfigError(f"--batchnorm is the MLPs'; the {self.name} model has none")

    def check_widths(self, settings: Settings, widths) -> None:
        """Refuse widths the family cannot take with these settings (a transformer's heads must divide them)."""

    def tensors(self, settings: Settings, width: int) -> dict[str, Spec]:
        raise NotImplementedError

    def init(self, settings: Settings, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One model's drawn tensors (fp32, CPU), shaped as tensors() says."""
        raise NotImplementedError

    def forward(self, t: dict[str, torch.Tensor], x: torch.Tensor, settings: Settings,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, D, p) for examples whose operands are x (S, B, D); mask: the step's dropout mask (B, D,
        dropout units), given only in training. Buffers (running statistics) are read as at evaluation."""
        raise NotImplementedError

    def reference(self, settings: Settings, hyper: Hyper, t: dict[str, torch.Tensor]) -> nn.Module:
        """One model (tensors t, unstacked) as its fastgrok.reference nn.Module, a copy of its weights."""
        raise NotImplementedError

    def ipr_parts(self, t: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """name -> (tensor (B, ...), the dim along the p residues): each unit's weight vectors, whose rfft IPR
        is averaged into the unit's IPR (fastgrok.ipr). The other non-batch dim indexes the units."""
        raise NotImplementedError

    def ipr_extra(self, t: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        """name -> (tensor (B, ...), the dim along the p residues): weight vectors that are not a unit's, whose
        mean IPR `fastgrok ipr` adds to models.csv as <name>_ipr (the transformer's embedding dimensions)."""
        return {}

    def bn_pairs(self, t: dict[str, torch.Tensor]) -> dict[str, tuple[dict, torch.Tensor]]:
        """column -> (weight vectors over the p residues as ipr_parts gives them, the BatchNorm weight (B, units)
        of the same units): `fastgrok ipr` adds the rank correlation of the units' IPR and |weight| to models.csv
        as that column; the first is drawn (ipr-vs-bn.png). Empty without BatchNorm."""
        return {}

    def prune(self, t: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """t with the units where keep (B, units) is 0 contributing nothing to any output."""
        raise NotImplementedError

    def trained(self, settings: Settings) -> tuple[str, ...]:
        """The names of the tensors the optimizer trains, in order (which they are does not depend on the width)."""
        return tuple(name for name, spec in self.tensors(settings, 1).items() if spec.trained)

    def units(self, settings: Settings, width: int) -> int:
        """Units that IPR describes and pruning removes (the hidden neurons of an MLP)."""
        return width

    def dropout_units(self, settings: Settings, width: int) -> int:
        """Entries per example of a dropout mask (Population.dropout_masks)."""
        return width

    def whole_batch(self, settings: Settings) -> bool:
        """Whether a step must see all its examples at once (BatchNorm's statistics): no spans of examples."""
        return False

    def train_forward(self, t, x, valid, D, settings: Settings, mask=None) -> tuple[torch.Tensor, list]:
        """A training step's logits (B, D, p) and the extras after_step takes (detached): forward, unless the
        family normalises by the statistics of the step's real examples (valid (B, D), counted in D (B,))."""
        return self.forward(t, x, settings, mask), []

    def grads(self, t: dict[str, torch.Tensor], x, y, valid, D, mask, settings: Settings) -> list[torch.Tensor]:
        """One step's terms for the models whose tensors are t: [losses (B,), a gradient per trained tensor, in
        tensors() order, then any extras after_step takes]. Losses are means over each model's D examples, so
        terms of spans of the examples add up. Default: autograd through train_forward."""
        trained = self.trained(settings)
        with torch.enable_grad():
            leaves = {k: (v.detach().requires_grad_() if k in trained else v) for k, v in t.items()}
            logits, extras = self.train_forward(leaves, x, valid, D, settings, mask)
            per_example = reference.per_example_loss(logits, y, settings.loss)
            losses = torch.where(valid, per_example, 0.0).sum(1) / D
            grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in trained])
        return [losses.detach(), *grads, *extras]

    def after_step(self, t: dict[str, torch.Tensor], extras: list[torch.Tensor], frozen: torch.Tensor) -> None:
        """Update buffers from a step's extras (grads' terms past the gradients); `frozen` (B,) models keep theirs."""

    def outputs(self, t: dict[str, torch.Tensor], x, y, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and per-example losses (B, E) of examples with operands x (S, B, E) and labels y:
        evaluation in torch."""
        logits = self.forward(t, x, settings)
        return logits.argmax(-1), reference.per_example_loss(logits, y, settings.loss)

    def step_bytes(self, settings: Settings, width: int, d: int) -> int:
        """Working memory of grads on d examples (of one model or of several), beyond the tensors and gradients."""
        raise NotImplementedError

    def eval_bytes(self, settings: Settings, width: int) -> int:
        """Working memory per example of outputs()."""
        raise NotImplementedError

    def row_bytes(self, settings: Settings, width: int) -> int:
        """Bytes of one example's widest activation row: the torch backend's CPU pieces are sized by it."""
        raise NotImplementedError

    def flops(self, settings: Settings, width: int, d: int) -> int:
        """FLOPs of one model-step on d examples, counted as the benchmark reports them: three times the forward's
        matmuls (the backward's two products per forward one); gathers and elementwise work not counted."""
        raise NotImplementedError


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def check_options(model: str, given) -> None:
    """Refuse an option of another family (`--depth` for a transformer) rather than ignore it. given: the names of
    the Settings fields given explicitly."""
    for name in given:
        owners = [f.name for f in FAMILIES.values() if name in f.options]
        if owners and model not in owners:
            raise ConfigError(f"--{name} is the {owners[0]} model's option; this run's model is {model}")


def family_of(settings: Settings) -> Family:
    """The family Settings.model names (Settings.check has refused any other)."""
    return FAMILIES[settings.model]


from fastgrok.families import deep_mlp, mlp, transformer  # noqa: E402,F401  (each registers its family)
