"""What a run is: the per-model hyper-parameters (grid axes), the settings all models share, and grid parsing."""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction

import numpy as np

from fastgrok.errors import ConfigError


@dataclass(frozen=True)
class Hyper:
    """One model: a point of the grid. Defaults are the paper's."""

    xi: float = 0.0       # fraction of training labels corrupted
    alpha: float = 0.5    # fraction of all p^2 pairs used for training
    width: int = 500      # hidden neurons N
    wd: float = 0.0       # weight decay (decoupled for AdamW)
    dropout: float = 0.0  # dropout rate on the pre-activation
    lr: float = 1e-2      # learning rate
    seed: int = 0         # model seed: init, and the data split and noise unless Settings.data_seed is set
    op: str | None = None  # the task (a named op or a polynomial); None: the run's Settings.op

    def split_seed(self, settings: "Settings") -> int:
        return self.seed if settings.data_seed is None else settings.data_seed


AXES = tuple(f.name for f in fields(Hyper))
# The fused kernels' dot precisions (kernels/hidden.py dot); the torch backend computes in fp32. The default is the
# fastest whose phases agree with fp32's on the validation grid (bench/validate_precision.py; H100, 2026-11-22: all
# four agree on all 39 models, and tf32 steps fastest, bench/results/h100-2026-11-22).
PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")
DEFAULT_PRECISION = "tf32"
INT_AXES = ("width", "seed")


@dataclass(frozen=True)
class Settings:
    """Shared by every model of a run. Defaults are the paper's."""

    model: str = "mlp"  # the model family (fastgrok.families)
    op: str = "add"
    terms: int = 2  # operands of the task: (x, y), or x1..xS (the MLP only)
    p: int = 97
    steps: int = 2000
    act: str = "quad"
    loss: str = "mse"
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    noise: str = "uniform"
    data_seed: int | None = None  # one data split and noise draw for all models; None: each model's own seed
    log_every: int = 100
    batch_size: int | None = None  # examples per step (minibatches reshuffled every epoch); None: full batch
    batchnorm: bool = False        # BatchNorm1d after the activation (torch backend)
    # the deep MLP's and the transformer's own (fastgrok.families checks them; other families ignore them)
    depth: int = 3                 # deep-mlp: hidden ReLU layers (the paper's Fig. 7b: 3 of width 500)
    init: str = "he"               # deep-mlp: he (N(0, 2 / fan_in), standard) or lazy (N(0, 2 / N^(2/3)), App. G.3)
    layers: int = 1                # transformer: blocks (the paper's Fig. 7a: 1)
    heads: int = 4                 # transformer: attention heads, dividing the width (d_model)
    layernorm: bool = False        # transformer: LayerNorm before attention, MLP and readout (the authors': off)
    scale: str = "mup"             # transformer: output scale 1/d and attention 1/d_head (muP) or 1/sqrt(d), 1/sqrt(d_head) (sp)
    tie: bool = False              # transformer: the token embedding is the unembedding too (weight tying)

    def __post_init__(self):
        # numpy scalars (a value taken from an array) as Python numbers, so that config.json can hold them
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple, np.ndarray)):
                value = tuple(v.item() if isinstance(v, np.generic) else v for v in value)
            object.__setattr__(self, f.name, value.item() if isinstance(value, np.generic) else value)

    def with_op(self, op: str | None) -> "Settings":
        """These settings for a model whose grid op is `op` (None: the run's own op)."""
        return self if op is None else replace(self, op=op)

    @property
    def batching(self) -> str:
        """'full batch', or 'minibatches of B' (and ', BatchNorm'): for summaries and figure titles."""
        batches = f"minibatches of {self.batch_size}" if self.batch_size else "full batch"
        return batches + (", BatchNorm" if self.batchnorm else "")

    def check(self, training: bool = True) -> None:
        from fastgrok.data import NOISES, check_task
        from fastgrok.families import FAMILIES
        from fastgrok.reference import ACT_NAMES, LOSSES, OPTIMIZERS, check_choice

        # from Python, a wrong type must read as a clear error too, not as a TypeError deep inside a step
        for name in ("p", "terms", "steps", "log_every", "batch_size", "data_seed", "depth", "layers", "heads"):
            value = getattr(self, name)
            if value is None and name in ("batch_size", "data_seed"):  # optional
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number, got {value!r}")
        betas = self.betas  # a tuple for any sequence given (__post_init__)
        if not (isinstance(betas, tuple) and len(betas) == 2
                and all(isinstance(b, numbers.Real) and math.isfinite(b) for b in betas)):
            raise ConfigError(f"betas must be two numbers, got {betas!r}")
        if not (isinstance(self.eps, numbers.Real) and 0.0 < self.eps < 1.0):
            raise ConfigError(f"eps must be a number in (0, 1), got {self.eps!r}")
        check_choice("model", self.model, FAMILIES)
        check_task(self.op, self.p, self.terms)
        FAMILIES[self.model].check(self)
        check_choice("activation", self.act, ACT_NAMES)
        check_choice("loss", self.loss, LOSSES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("noise", self.noise, NOISES)
        if training and self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if training and self.log_every < 1:
            raise ConfigError(f"log-every must be at least 1, got {self.log_every}")
        if self.batch_size is not None and self.batch_size < (2 if self.batchnorm else 1):
            need = "at least 2 with BatchNorm (batch statistics)" if self.batchnorm else "at least 1"
            raise ConfigError(f"batch-size must be {need}, got {self.batch_size}")
        if self.data_seed is not None and self.data_seed < 0:  # as --seed, which it stands in for
            raise ConfigError(f"data-seed must be non-negative, got {self.data_seed}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {self.betas}")


def parse_betas(text: str) -> tuple[float, float]:
    """'0.9,0.98' -> (0.9, 0.98), as --betas takes them."""
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--betas: cannot read {text!r}; give two numbers like 0.9,0.98") from None
    if len(betas) != 2:
        raise ConfigError(f"--betas takes two numbers, got {text!r}")
    return betas


# the values each grid axis takes, and how the command line says it
AXIS_RULES = {
    "xi": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "alpha": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "width": (lambda v: v >= 1, "at least 1"),
    "wd": (lambda v: v >= 0.0, "non-negative"),
    "dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "lr": (lambda v: v > 0.0, "positive"),
    "seed": (lambda v: 0 <= v < 2**63, "in [0, 2^63)"),  # seeds key 64-bit random streams (data.stream_seed)
    "op": (lambda v: True, "a task"),  # checked against p and the operands (Settings.of_model, check_tasks)
}
TEXT_AXES = ("op",)  # axes of text values: a comma list, kept as written


def axis_text(value) -> str:
    """A grid value as tables and figures show it: 0.35, 500, x^2+y^2."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def check_value(axis: str, value) -> None:
    ok, want = AXIS_RULES[axis]
    if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"--{axis} must be {want}, got {value}")


def _number(axis: str, text: str):
    """One value of an axis: a whole number, exactly, for the integer axes (a seed of 2^53 + 1 is not 2^53)."""
    if axis not in INT_AXES:
        return float(text)
    try:
        return int(text)
    except ValueError:
        value = float(text)  # 1e3
        if not value.is_integer():
            raise ConfigError(f"--{axis} takes whole numbers, got {text!r}") from None
        return int(value)


def parse_axis(axis: str, spec: str) -> list:
    """'0,0.35' -> [0.0, 0.35]; '0:0.9:19' -> 19 evenly spaced values from 0 to 0.9 inclusive (whole numbers,
    rounded, on the integer axes)."""
    text = str(spec).strip()
    if axis in TEXT_AXES:
        values = [v.strip() for v in text.split(",")]
        if not all(values):
            raise ConfigError(f"--{axis}: cannot read {spec!r}; give one value or a comma list")
        return list(dict.fromkeys(values))
    bad = ConfigError(f"--{axis}: cannot read {spec!r}; give a comma list like 0,0.35 or start:stop:count like 0:0.9:19")
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            count = int(count)
            if count < 1:
                raise ValueError
            if axis in INT_AXES:
                first, last = _number(axis, start), _number(axis, stop)
                values = [first + round(Fraction(last - first) * k / max(1, count - 1)) for k in range(count)]
            else:
                values = np.linspace(float(start), float(stop), count).tolist()
        else:
            values = [_number(axis, v) for v in text.split(",")]
    except ConfigError:
        raise
    except (ValueError, OverflowError):
        raise bad from None
    if not values or any(not math.isfinite(v) for v in values):
        raise bad
    if axis not in INT_AXES:
        values = [float(f"{v:.12g}") for v in values]  # 0.30000000000000004 -> 0.3
    return list(dict.fromkeys(values))  # drop repeats, keep order


@dataclass(frozen=True)
class Grid:
    """The product of the axes, in AXES order; axes not given keep their Hyper default."""

    axes: dict

    @classmethod
    def parse(cls, specs: dict[str, str | None]) -> "Grid":
        unknown = set(specs) - set(AXES)
        if unknown:
            raise ConfigError(f"unknown grid axis {sorted(unknown)[0]!r}; axes are {', '.join(AXES)}")
        defaults = asdict(Hyper())
        axes = {a: (parse_axis(a, specs[a]) if specs.get(a) is not None else [defaults[a]]) for a in AXES}
        if axes["op"] != [None] and len(axes["op"]) == 1:  # one task is the run's Settings.op, not an axis
            raise ConfigError("give the op axis two tasks or more; one task is Settings(op=...) (--op)")
        for a, values in axes.items():  # the values of each axis, not each of the product's models
            for value in values:
                check_value(a, value)
        return cls(axes)

    @classmethod
    def of(cls, **axes) -> "Grid":
        """From Python: Grid.of(xi=np.linspace(0, 0.6, 13), wd=[0, 5, 15], seed=range(3)); a number is one value.
        Checked as the command line's --xi, --wd, ... are."""
        return cls.parse({a: ",".join(str(v) for v in np.atleast_1d(np.asarray(values)).tolist())
                          for a, values in axes.items()})

    def models(self) -> list[Hyper]:
        return [Hyper(**dict(zip(AXES, values))) for values in itertools.product(*(self.axes[a] for a in AXES))]

    def model(self, i: int) -> Hyper:
        """Model i of models(), without building the others: its index read as digits of the axes' sizes."""
        values = {}
        for a in reversed(AXES):
            i, k = divmod(i, len(self.axes[a]))
            values[a] = self.axes[a][k]
        return Hyper(**values)

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    def describe(self) -> str:
        return " x ".join(f"{a} {_short(v)}" for a, v in self.axes.items() if len(v) > 1) or "one model"


def plural(noun: str, n: int) -> str:
    """The noun for n of it: "1 model", "2 models"."""
    return noun if n == 1 else noun + "s"


def _short(values: list) -> str:
    if len(values) <= 4:
        return ",".join(axis_text(v) for v in values)
    return f"{axis_text(values[0])}..{axis_text(values[-1])} ({len(values)})"
