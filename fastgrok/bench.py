"""Training throughput, side by side in one process: the reference.py loop (one model at a time) and each
population backend, in model-steps/s and TFLOP/s (6 D N p FLOPs per model-step: forward, dW and dH).

Every backend's first step is checked against reference.py before anything is timed.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass

import torch

from fastgrok import reference
from fastgrok.backends import TorchBackend
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population
from fastgrok.results import device_name, versions

# Dense peak rates (TFLOP/s) used for "% of peak"; measured figures from the project's notes where we have them.
PEAKS = {"H100": {"fp32": 51.0, "tf32": 406.0, "bf16": 781.0}}


@dataclass
class Result:
    backend: str
    width: int
    models: int
    model_steps_per_s: float
    tflops: float
    seconds_per_step: float


def flops_per_model_step(p: int, width: int, d: int) -> int:
    return 6 * d * width * p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reference(settings: Settings, width: int, alpha: float, steps: int, device: torch.device) -> float:
    """Seconds per step of reference.py training one model (the per-model loop every public codebase runs)."""
    pop = Population([Hyper(width=width, alpha=alpha)], settings)
    mlp = pop.model(0).to(device)
    opt = reference.make_optimizer(mlp, settings.optimizer, 1e-2, 0.0, settings.betas, settings.eps)
    d = int(pop.D[0])
    m, n, y = (t[0, :d].to(device) for t in (pop.train_m, pop.train_n, pop.train_y))
    for _ in range(3):
        reference.train_step(mlp, opt, m, n, y, settings.loss)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        reference.train_step(mlp, opt, m, n, y, settings.loss)
    _sync(device)
    return (time.perf_counter() - start) / steps


def check_backend(engine, settings: Settings, width: int, alpha: float, device: torch.device) -> float:
    """Max |loss - reference loss| over two steps of three models; raises if above 1e-4 (relative)."""
    hypers = [Hyper(width=width, alpha=alpha, xi=xi, seed=s) for s, xi in enumerate((0.0, 0.3, 0.6))]
    pop = Population(hypers, settings, device)
    refs = [pop.model(b) for b in range(len(hypers))]
    opts = [reference.make_optimizer(r, settings.optimizer, 1e-2, 0.0, settings.betas, settings.eps) for r in refs]
    worst = 0.0
    for _ in range(2):
        losses = engine.step(pop).cpu()
        for b, (mlp, opt) in enumerate(zip(refs, opts)):
            d = int(pop.D[b])
            ref = reference.train_step(mlp, opt, pop.train_m[b, :d].cpu(), pop.train_n[b, :d].cpu(),
                                       pop.train_y[b, :d].cpu(), settings.loss)
            worst = max(worst, abs(losses[b].item() - ref) / abs(ref))
    if worst > 1e-4:
        raise AssertionError(f"{getattr(engine, 'name', engine)} disagrees with reference.py: relative loss error {worst:.2e}")
    return worst


def time_backend(engine, settings: Settings, width: int, models: int, alpha: float, steps: int,
                 device: torch.device) -> float:
    pop = Population([Hyper(width=width, alpha=alpha, seed=b) for b in range(models)], settings, device)
    for _ in range(3):
        engine.step(pop)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(pop)
    _sync(device)
    return (time.perf_counter() - start) / steps


def run(widths=(128, 500), models=(1, 16), p: int = 97, alpha: float = 0.5, steps: int = 20,
        device: str = "cpu", backends: dict | None = None, log=print) -> dict:
    dev = torch.device(device)
    settings = Settings(p=p)
    backends = backends or {"torch": TorchBackend()}
    d = int(alpha * p * p)
    for name, engine in backends.items():
        err = check_backend(engine, settings, min(widths), alpha, dev)
        log(f"{name}: matches reference.py (relative loss error {err:.1e})")
    log("All results match. Starting benchmarks.")
    results = []
    for width in widths:
        flops = flops_per_model_step(p, width, d)
        sec = time_reference(settings, width, alpha, steps, dev)
        results.append(Result("reference", width, 1, 1 / sec, flops / sec / 1e12, sec))
        log(_line(results[-1]))
        for name, engine in backends.items():
            for b in models:
                sec = time_backend(engine, settings, width, b, alpha, steps, dev)
                results.append(Result(name, width, b, b / sec, b * flops / sec / 1e12, sec))
                log(_line(results[-1]))
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(dev),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "setting": {"p": p, "alpha": alpha, "train_examples": d, "loss": settings.loss, "optimizer": settings.optimizer,
                    "steps_timed": steps},
        "results": [asdict(r) for r in results],
    }


def _line(r: Result) -> str:
    return (f"{r.backend:>10} N {r.width:>5} B {r.models:>5}: {r.model_steps_per_s:>10,.1f} model-steps/s "
            f"{r.tflops:8.4f} TFLOP/s")
