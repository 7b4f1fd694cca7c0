"""Named runs. `fastgrok train` with no grid option runs `cpu-demo` on a CPU and `paper-xi-wd` on a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastgrok.config import Grid, Settings, parse_betas
from fastgrok.errors import ConfigError
from fastgrok.families import FAMILIES, check_options
from fastgrok.polynomials import SURVEY


@dataclass(frozen=True)
class Preset:
    about: str
    axes: dict = field(default_factory=dict)      # grid axis -> spec, as on the command line
    settings: dict = field(default_factory=dict)  # Settings overrides


PRESETS = {
    "paper-xi-wd": Preset(
        "the paper's settings (p 97, N 500, alpha 0.5, 2000 steps): 13 xi x 3 weight decays = 39 models",
        axes={"xi": "0:0.6:13", "wd": "0,5,15"},
    ),
    "cpu-demo": Preset(
        "the xi x wd panel shrunk to train in about 1.5 minutes on 2 CPU cores (p 47, N 128 instead of p 97, "
        "N 500): 13 xi x 3 weight decays = 39 models, 2000 steps",
        axes={"xi": "0:0.6:13", "wd": "0,5,15", "width": "128"},
        settings={"p": 47},
    ),
    "wd-diagram": Preset(
        "alpha x xi phase diagrams at four weight decays, N 500, p 97: 17 x 17 x 4 = 1,156 models "
        "(the size of the paper's weight-decay figure)",
        axes={"alpha": "0.1:0.9:17", "xi": "0:0.8:17", "wd": "0,5,15,20"},
    ),
    "dropout-diagram": Preset(
        "alpha x xi phase diagrams at four dropout rates, N 500, p 97: 17 x 17 x 4 = 1,156 models",
        axes={"alpha": "0.1:0.9:17", "xi": "0:0.8:17", "dropout": "0,0.3,0.6,0.9"},
    ),
    "transformer-diagram": Preset(
        "the transformer of the paper's Fig. 7a (1 layer, d 128, 4 heads, ReLU, MSE, AdamW lr 1e-3, 3000 steps), "
        "alpha x xi at four weight decays, p 97: 17 x 17 x 4 = 1,156 models",
        axes={"alpha": "0.1:0.9:17", "xi": "0:0.8:17", "wd": "0,1,5,10", "width": "128", "lr": "0.001"},
        settings={"model": "transformer", "steps": 3000},
    ),
    "deep-mlp-diagram": Preset(
        "the deeper ReLU MLP of the paper's Fig. 7b (3 hidden layers of width 500), alpha x xi at four weight "
        "decays, p 97: 17 x 17 x 4 = 1,156 models",
        axes={"alpha": "0.1:0.9:17", "xi": "0:0.8:17", "wd": "0,5,15,20", "width": "500"},
        settings={"model": "deep-mlp", "depth": 3},
    ),
    "transformer-cpu": Preset(
        "the transformer's phases in a few minutes on 2 CPU cores (p 23, d 64, lr 5e-3, 1500 steps): "
        "4 alpha x 5 xi x weight decay 0, 5 and 7 = 60 models",
        axes={"alpha": "0.6:0.9:4", "xi": "0:0.3:5", "wd": "0,5,7", "width": "64", "lr": "0.005"},
        settings={"model": "transformer", "p": 23, "steps": 1500},
    ),
    "deep-mlp-cpu": Preset(
        "the deeper MLP's phases in a few minutes on 2 CPU cores (p 41, 2 hidden layers of width 256, lr 3e-3, "
        "3000 steps): 4 alpha x 4 xi x weight decay 0 and 15 = 32 models",
        axes={"alpha": "0.45:0.9:4", "xi": "0:0.3:4", "wd": "0,15", "width": "256", "lr": "0.003"},
        settings={"model": "deep-mlp", "depth": 2, "p": 41, "steps": 3000},
    ),
    "polynomials": Preset(
        "which polynomials a network learns (the sequel's Section 5, Appendix C's size: p 97, N 5000, AdamW lr "
        "5e-3, wd 5, 3000 steps): 14 polynomials of both predicted classes x 4 alpha x 2 seeds = 112 models; "
        "`fastgrok learnability RUN` tabulates them",
        axes={"op": ",".join(SURVEY), "alpha": "0.3:0.9:4", "seed": "0,1", "width": "5000", "wd": "5",
              "lr": "0.005"},
        settings={"steps": 3000},
    ),
    "polynomials-cpu": Preset(
        "the polynomials preset in a few minutes on 2 CPU cores (p 23, N 256, 2000 steps): 14 polynomials x 4 "
        "alpha x 2 seeds = 112 models",
        axes={"op": ",".join(SURVEY), "alpha": "0.3:0.9:4", "seed": "0,1", "width": "256", "wd": "5",
              "lr": "0.005"},
        settings={"p": 23, "steps": 2000},
    ),
}


def default_preset(device_type: str) -> str:
    return "paper-xi-wd" if device_type == "cuda" else "cpu-demo"


@dataclass(frozen=True)
class Request:
    """What `fastgrok train` was asked for, resolved: the grid and settings, and the preset they came from."""

    grid: Grid
    settings: Settings
    preset: str | None = None
    about: str = ""
    default: bool = False  # the preset was chosen because no grid option was given
    cpu: bool = False  # ... on a CPU, where the default is smaller than the paper's
    overrides: tuple[str, ...] = ()  # the options given on top of the preset, as typed


def resolve(preset: str | None, axes: dict, shared: dict, device: str = "auto", d_model: str | None = None) -> Request:
    """The grid and settings of `fastgrok train`: the preset's (the default preset when no grid axis is given,
    default_preset of the device), with every option given overriding it, and the model family's own defaults
    under both. axes: grid axis -> spec as typed (None: not given); shared: Settings field -> value (None: not
    given; betas as typed, '0.9,0.98'); d_model: the transformer's name for the width axis."""
    from fastgrok.device import resolve_device

    if d_model is not None:
        if axes.get("width") is not None:
            raise ConfigError("--d-model is the transformer's --width: give one of them")
        axes = {**axes, "width": d_model}
    device_type = resolve_device(device).type
    default = preset is None and all(v is None for v in axes.values())
    if default:
        preset = default_preset(device_type)
    chosen = PRESETS.get(preset) if preset is not None else Preset("")
    if chosen is None:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    given = {k.replace("_", "-"): v for k, v in {**axes, **shared}.items() if v is not None}
    overrides = tuple(f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}" for k, v in given.items())
    values = {**chosen.settings, **{k: v for k, v in shared.items() if v is not None}}
    model = values.get("model", Settings.model)
    family = FAMILIES.get(model)
    if family is not None:
        check_options(model, [k for k, v in shared.items() if v is not None])
        if d_model is not None and model != "transformer":
            raise ConfigError(f"--d-model is the transformer's width; this run's model is {model}: give --width")  # what the family starts from (the deeper ones: relu), unless given (Settings.check)
        values = {**family.defaults, **values}
        if values.get("terms", 2) != 2 and "act" not in values:  # the sequel's many-term network: x^S
            values["act"] = "pow"
    if isinstance(values.get("betas"), str):
        values["betas"] = parse_betas(values["betas"])
    settings = Settings(**values)
    settings.check()
    grid = Grid.parse({k: v if v is not None else chosen.axes.get(k) for k, v in axes.items()})
    return Request(grid, settings, preset, chosen.about, default, default and device_type == "cpu", overrides)


def check_resume(given: dict, dry_run: bool) -> None:
    """--resume takes everything from the run: refuse any grid option, setting, preset or --out beside it."""
    named = [k for k, v in given.items() if v is not None]
    if named:
        raise ConfigError(f"--resume takes the grid and settings from the run; drop --{named[0].replace('_', '-')}")
    if dry_run:
        raise ConfigError("--dry-run plans a new run; drop --resume")
