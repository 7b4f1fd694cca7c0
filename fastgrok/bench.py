"""Training throughput, side by side in one process: the reference.py loop (one model at a time) and each
population backend, in model-steps/s, TFLOP/s (6 D N p FLOPs per model-step: forward, dW and dH) and % of the
device's peak for the precision used, the peaks measured in the same run (large matmuls through torch).

Every variant's first steps are checked against reference.py before anything is timed.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastgrok import plots, process, reference
from fastgrok.backends import TorchBackend
from fastgrok.config import Hyper, Settings
from fastgrok.data import check_task, pair_count, train_size
from fastgrok.errors import ConfigError
from fastgrok.device import device_name, resolve_device
from fastgrok.families import FAMILIES, check_options, family_of
from fastgrok.families.mlp_triton import TritonBackend
from fastgrok.planner import memory_budget, models_that_fit
from fastgrok.population import Population
from fastgrok.results import versions, write_atomic


class TritonBlockBackend(TritonBackend):
    """The Triton step with the "block" example order, forward and scatter (kernels/block.py), which no GPU has
    measured: a benchmark variant until a measurement decides it. TritonBackend but for the example order and
    the forward and backward kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name += "-block"

    @staticmethod
    def default_step(precision: str) -> tuple[bool, dict]:
        from fastgrok.kernels.block import default_step

        return default_step(precision)

    @staticmethod
    def example_order(m, n, valid, p: int) -> tuple[torch.Tensor, dict]:
        """block_order, and its block offsets ("blocks"), which both kernels need to be right."""
        from fastgrok.kernels.block import block_order

        perm, blocks = block_order(m, n, valid, p)
        return perm, {"blocks": blocks}

    def forward(self, pop: Population, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from fastgrok.kernels import block
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        s = pop.settings
        example_loss, G, _ = block.forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"], data["blocks"],
                                           act=ACT_CODES[s.act], loss=LOSS_CODES[s.loss], precision=self.precision,
                                           train=True, dropout=data["masks"], **self.forward_tiles)
        return example_loss, G

    def backward(self, pop: Population, data: dict, G: torch.Tensor):
        from fastgrok.kernels import block
        from fastgrok.kernels.hidden import ACT_CODES

        return block.backward(pop.U, pop.V, pop.W, data["m"], data["n"], data["count"], G, data["blocks"],
                              act=ACT_CODES[pop.settings.act], precision=self.precision, dropout=data["masks"],
                              fused=self.fused, **self.backward_tiles)


class VmapBackend:
    """The baseline torch.func offers for many models: the family's reference module, its parameters stacked
    (stack_module_state), each model's loss gradient by vmap(grad(functional_call)) over the stacked models, and a
    torch AdamW over the stacked tensors (every model the first one's lr and weight decay). It keeps its own
    parameters, starting from the population's."""

    name = "torch-vmap"

    def __init__(self, compile: bool = False):
        self.compile = compile
        self.name = "torch-vmap" + ("-compile" if compile else "")
        self._state = weakref.WeakKeyDictionary()

    def check(self, settings) -> None:
        if settings.batchnorm:
            raise ConfigError("the vmap baseline has no BatchNorm")

    def step_bytes(self, settings, width: int, d: int, models: int, device: torch.device, dropout: bool) -> int:
        return models * family_of(settings).step_bytes(settings, width, d)

    def eval_bytes(self, settings, width: int) -> int:
        return family_of(settings).eval_bytes(settings, width)

    def step(self, pop: Population) -> torch.Tensor:
        if pop not in self._state:
            self._state[pop] = self._prepare(pop)
        params, gradient, opt = self._state[pop]
        x, y, valid, D = pop.batch()
        grads, losses = gradient(params, x.movedim(1, 0), y, valid, D)  # vmap over the models: x's dim 1
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        return losses

    def _prepare(self, pop: Population):
        models = [pop.model(b).to(pop.device) for b in range(len(pop))]
        params, _ = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        loss_name = pop.settings.loss

        def loss(p, x, y, valid, D):
            per_example = reference.per_example_loss(torch.func.functional_call(base, p, tuple(x)), y, loss_name)
            return torch.where(valid, per_example, 0.0).sum() / D

        gradient = torch.func.vmap(torch.func.grad_and_value(loss), randomness="different")
        if self.compile:
            gradient = torch.compile(gradient, dynamic=False)
        h, s = pop.hypers[0], pop.settings
        opt = torch.optim.AdamW(list(params.values()), lr=h.lr, betas=s.betas, eps=s.eps, weight_decay=h.wd)
        return params, gradient, opt


# The Triton step by its scatter, for the scripts that compare them (bench/sweep_blocks.py, bench/profile_step.py)
TRITON_STEPS = {"window": TritonBackend, "block": TritonBlockBackend}
# name -> (precision of its matmuls, whether torch may use TF32, how to build it)
VARIANTS = {
    "torch": ("fp32", False, lambda: TorchBackend()),
    "torch-tf32": ("tf32", True, lambda: TorchBackend()),
    "torch-compile": ("tf32", True, lambda: TorchBackend(compile=True)),
    "torch-vmap": ("fp32", False, lambda: VmapBackend()),
    "torch-vmap-compile": ("tf32", True, lambda: VmapBackend(compile=True)),
    "triton-fp32": ("fp32", False, lambda: TritonBackend("fp32")),
    "triton-tf32": ("tf32", False, lambda: TritonBackend("tf32")),
    "triton-tf32x3": ("fp32", False, lambda: TritonBackend("tf32x3")),
    "triton-bf16": ("bf16", False, lambda: TritonBackend("bf16")),
    # the block order and scatter (kernels/block.py) against the default step, until a GPU has compared them
    "triton-tf32-block": ("tf32", False, lambda: TritonBlockBackend("tf32")),
    "triton-bf16-block": ("bf16", False, lambda: TritonBlockBackend("bf16")),
}
DEFAULT_VARIANTS = {"cpu": ("torch", "torch-vmap"), "cuda": tuple(VARIANTS)}
GPU_ONLY = ("triton", "torch-compile", "torch-vmap-compile")  # variants (by prefix) that run only on a GPU
PARITY = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2}  # relative loss error allowed in the pre-timing check


@dataclass
class Result:
    backend: str
    width: int
    models: int
    model_steps_per_s: float
    tflops: float
    percent_of_peak: float | None
    seconds_per_step: float | None  # None where it could not be timed (note says why)
    note: str = ""


def flops_per_model_step(p: int, width: int, d: int, settings: Settings | None = None) -> int:
    """The family's FLOPs of one model-step (the MLP's 6 D N p by default)."""
    settings = Settings(p=p) if settings is None else settings
    return family_of(settings).flops(settings, width, d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _timed(fn, device: torch.device, min_seconds: float = 0.5, max_steps: int = 200) -> float:
    """Mean time per call in steady state: 3 warm-up calls, then enough calls to fill `min_seconds`."""
    for _ in range(3):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    steps = int(min(max_steps, max(3, math.ceil(min_seconds / estimate))))
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure_peaks(device: torch.device, size: int = 8192) -> dict[str, float]:
    """TFLOP/s of a large square matmul in fp32 (no TF32), TF32 and bf16: the ceilings for '% of peak'. On a CPU
    fp32 only, at 1024 (2 GFLOP a product: 7 ms on the 2-core development machine, against 3 s at 8192)."""
    if device.type == "cpu":
        kinds, size, seconds = (("fp32", torch.float32, False),), min(size, 1024), 0.3
    elif device.type == "cuda":
        kinds, seconds = (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)), 1.0
    else:
        return {}
    peaks = {}
    for name, dtype, tf32 in kinds:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        with _tf32(tf32):
            sec = _timed(lambda: a @ b, device, min_seconds=seconds, max_steps=50)
        peaks[name] = 2 * size**3 / sec / 1e12
        del a, b
    return peaks


def reference_seconds(settings: Settings, width: int, alpha: float, device: torch.device) -> float:
    """Seconds per step of reference.py training one model (the per-model loop every public codebase runs)."""
    pop = Population([Hyper(width=width, alpha=alpha)], settings)
    mlp = pop.model(0).to(device)
    opt = reference.make_optimizer(mlp, settings.optimizer, 1e-2, 0.0, settings.betas, settings.eps)
    d = int(pop.D[0])
    x, y = pop.train_x[:, 0, :d].to(device), pop.train_y[0, :d].to(device)
    return _timed(lambda: reference.train_step(mlp, opt, x, y, settings.loss), device)


def check_variant(name: str, settings: Settings, width: int, alpha: float, device: torch.device) -> float:
    """Largest relative loss error against reference.py over two steps of three models."""
    precision, tf32, make = VARIANTS[name]
    engine = make()
    engine.check(settings)  # a p the kernels do not take is said as such, not as a compile failure
    hypers = [Hyper(width=width, alpha=alpha, xi=xi, seed=s) for s, xi in enumerate((0.0, 0.3, 0.6))]
    pop = Population(hypers, settings, device)
    refs = [pop.model(b) for b in range(len(hypers))]
    opts = [reference.make_optimizer(r, settings.optimizer, 1e-2, 0.0, settings.betas, settings.eps) for r in refs]
    worst = 0.0
    for _ in range(2):
        with _tf32(tf32):
            losses = engine.step(pop).cpu()
        for b, (mlp, opt) in enumerate(zip(refs, opts)):
            d = int(pop.D[b])
            ref = reference.train_step(mlp, opt, pop.train_x[:, b, :d].cpu(), pop.train_y[b, :d].cpu(), settings.loss)
            worst = max(worst, abs(losses[b].item() - ref) / abs(ref))
    if not worst <= PARITY[precision]:
        raise AssertionError(f"{name} disagrees with reference.py: relative loss error {worst:.2e}")
    return worst


def max_models(settings: Settings, width: int, alpha: float, device: torch.device, engine) -> int:
    num_pairs = pair_count(settings.op, settings.p, settings.terms)
    return models_that_fit(settings, width, train_size(num_pairs, alpha), num_pairs, device, memory_budget(device),
                           engine)


class Interrupted(Exception):
    """Ctrl-C (or the SIGINT of a time limit) during a benchmark; `report` holds every result measured before it."""

    def __init__(self, report: dict):
        super().__init__("benchmark interrupted")
        self.report = report


def run(widths=(128, 500), models=("1", "16"), p: int = 97, alpha: float = 0.5, device: str = "cpu",
        variants: tuple[str, ...] | None = None, log=print, out: Path | None = None, model: str = "mlp",
        family_settings: dict | None = None) -> dict:
    """models: population sizes; "max" is the largest that the memory planner fits for each variant. model: the
    family (fastgrok.families), at its defaults updated by family_settings (depth, layers, heads, layernorm, scale);
    the Triton variants are the MLP's.

    out: a JSON file the report is written to after every result (and its figure, out with .png, at the end and
    on an interrupt), so that a benchmark cut short (a time limit, Ctrl-C) keeps what it measured; Ctrl-C raises
    Interrupted with the partial report, marked "interrupted", after saving it."""
    dev = resolve_device(device)
    check_task("add", p)
    if not widths or min(widths) < 1 or not models or any(str(b) != "max" and not (str(b).isdigit() and int(b) >= 1)
                                                           for b in models):
        raise ConfigError(f"--width and --models take positive whole numbers (or 'max'), got {widths!r}, {models!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {alpha}")
    if model not in FAMILIES:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(FAMILIES)}")
    family = FAMILIES[model]
    check_options(model, family_settings or {})
    variants = variants or tuple(v for v in DEFAULT_VARIANTS[dev.type]
                                 if not v.startswith("triton") or "triton" in family.fused)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown benchmark variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if dev.type == "cpu" and any(v.startswith(GPU_ONLY) for v in variants):
        raise ConfigError("the triton and compiled variants are GPU benchmarks; on a CPU use torch or torch-vmap")
    if any(v.startswith("triton") for v in variants) and "triton" not in family.fused:
        raise ConfigError(f"the {model} model has no triton kernels; use the torch variants")
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'bench.json'}")
        out.parent.mkdir(parents=True, exist_ok=True)
    if dev.type == "cpu":
        process.tune_cpu()
    settings = Settings(p=p, **{**family.defaults, **(family_settings or {}), "model": model})
    settings.check()
    family.check_widths(settings, widths)
    d = train_size(pair_count(settings.op, p), alpha)
    for width in widths:  # the least demanding variant asked for must fit one model of every width
        engines = [VARIANTS[v][2]() for v in variants]
        max_models(settings, width, alpha, dev, min(engines, key=lambda e: e.step_bytes(settings, width, d, 1, dev, False)))

    def save(report: dict, figure: bool = False) -> None:
        if out is not None:
            write_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
            if figure:
                plots.bench_throughput(report, out.with_suffix(".png"))

    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(dev),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "peaks_tflops": {},
        "failed": {},
        "setting": {"model": model, **(family_settings or {}), "p": p, "alpha": alpha,
                    "train_examples": train_size(p * p, alpha),
                    "loss": settings.loss, "optimizer": settings.optimizer,
                    "flops_per_model_step": (family.flops.__doc__ or "").strip().split(":")[0]},
        "results": [],
    }
    try:
        _measure(report, widths, models, variants, settings, alpha, dev, log, save)
    except KeyboardInterrupt:
        report["interrupted"] = True
        save(report, figure=True)
        raise Interrupted(report) from None
    save(report, figure=True)
    return report


def _measure(report, widths, models, variants, settings, alpha, dev, log, save) -> None:
    """Check every variant against reference.py, measure the peaks, then time every (width, variant, population
    size) into report["results"], saved after each."""
    p, d, failed = settings.p, report["setting"]["train_examples"], report["failed"]
    for name in variants:
        try:
            err = check_variant(name, settings, min(widths), alpha, dev)
            log(f"{name}: matches reference.py (relative loss error {err:.1e})")
        except Exception as e:  # one broken variant must not cost the others their measurement
            failed[name] = f"{type(e).__name__}: {e}"
            log(f"{name}: NOT TIMED, {failed[name]}")
    variants = [v for v in variants if v not in failed]
    log("All results match. Starting benchmarks." if not failed else "The others match. Starting benchmarks.")
    peaks = report["peaks_tflops"] = measure_peaks(dev)
    if peaks:
        log("measured peaks (TFLOP/s): " + ", ".join(f"{k} {v:.3g}" for k, v in peaks.items()))

    def add(result: Result) -> None:
        report["results"].append(asdict(result))
        save(report)
        if result.model_steps_per_s > 0:
            log(_line(result))

    for width in widths:
        flops = flops_per_model_step(p, width, d, settings)
        sec = reference_seconds(settings, width, alpha, dev)
        add(Result("reference", width, 1, 1 / sec, flops / sec / 1e12, _percent(flops / sec, peaks, "fp32"), sec))
        for name in variants:
            precision, tf32, make = VARIANTS[name]
            engine = make()
            try:
                limit = max_models(settings, width, alpha, dev, engine)
            except ConfigError as e:
                log(f"{name} N {width}: {e}")
                add(Result(name, width, 1, 0.0, 0.0, None, None, "does not fit"))
                continue
            sizes = sorted({limit if str(b) == "max" else min(int(b), limit) for b in models})
            for b in sizes:
                pop = None
                try:
                    pop = Population([Hyper(width=width, alpha=alpha, seed=i) for i in range(b)], settings, dev)
                    with _tf32(tf32):
                        sec = _timed(lambda: engine.step(pop), dev)
                    add(Result(name, width, b, b / sec, b * flops / sec / 1e12, _percent(b * flops / sec, peaks, precision),
                               sec, "max" if b == limit else ""))
                except torch.cuda.OutOfMemoryError:
                    log(f"{name} N {width} B {b}: out of memory")
                    add(Result(name, width, b, 0.0, 0.0, None, None, "out of memory"))
                except Exception as e:  # e.g. a compile failure at one size: record it, keep measuring
                    log(f"{name} N {width} B {b}: {type(e).__name__}: {e}")
                    add(Result(name, width, b, 0.0, 0.0, None, None, f"{type(e).__name__}: {e}"[:300]))
                del pop
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


def _percent(flops_per_s: float, peaks: dict, precision: str) -> float | None:
    return 100 * flops_per_s / 1e12 / peaks[precision] if precision in peaks else None


def _line(r: Result) -> str:
    peak = f" {r.percent_of_peak:5.1f}% of peak" if r.percent_of_peak is not None else ""
    return (f"{r.backend:>14} N {r.width:>5} B {r.models:>5}: {r.model_steps_per_s:>11,.1f} model-steps/s "
            f"{r.tflops:9.4f} TFLOP/s{peak}")
