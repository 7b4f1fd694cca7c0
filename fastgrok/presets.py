"""Named runs. `fastgrok train` with no grid option runs `cpu-demo` on a CPU and `paper-xi-wd` on a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field


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
}


def default_preset(device_type: str) -> str:
    return "paper-xi-wd" if device_type == "cuda" else "cpu-demo"
