"""pytest-benchmark view of the training step: `pytest bench/ --benchmark-only` (GPU variants need CUDA).

The side-by-side report with TFLOP/s and % of peak is `fastgrok bench`; this file times the same variants
under pytest-benchmark's statistics, after the same parity check against reference.py."""

import pytest
import torch

from fastgrok.bench import DEFAULT_VARIANTS, VARIANTS, _sync, _tf32, check_variant
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETTINGS = Settings(p=97)


@pytest.mark.parametrize("variant", DEFAULT_VARIANTS[DEVICE.type])
@pytest.mark.parametrize("width, models", [(128, 16), (512, 16)] if DEVICE.type == "cpu" else [(128, 1024), (512, 1024), (2048, 256)])
def test_step(benchmark, variant, width, models):
    check_variant(variant, SETTINGS, width, 0.5, DEVICE)
    precision, tf32, make = VARIANTS[variant]
    engine = make()
    pop = Population([Hyper(width=width, seed=i) for i in range(models)], SETTINGS, DEVICE)

    def step():
        engine.step(pop)
        _sync(DEVICE)

    with _tf32(tf32):
        benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    benchmark.extra_info["model_steps_per_s"] = models / benchmark.stats["median"]
