"""The fastgrok command line. Each command parses its options, calls one library function and prints what it
returned; heavy imports stay inside the commands, so that --help is instant."""

from __future__ import annotations

import datetime
import functools
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from fastgrok import __version__
from fastgrok.config import DEFAULT_PRECISION, PRECISIONS, Hyper, Settings
from fastgrok.reproduce import EXPERIMENTS

GRID = "Grid (each: a comma list 0,0.35 or start:stop:count 0:0.9:19)"
SHARED = "Shared settings"
FAMILY = "The deep MLP's and the transformer's settings"
PLAIN_PROGRESS_SECONDS = 60.0  # a progress line this often when stderr is not a terminal
HYPER, SETTINGS = Hyper(), Settings()  # the defaults the help shows


class _Flags:
    """A flag takes no value: --help shows no type beside it (typer marks every flag <bool>)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Command(_Flags, TyperCommand):
    pass


class _Group(_Flags, TyperGroup):
    pass


app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True, add_completion=False, cls=_Group,
                  help="Train thousands of one-hot MLPs on corrupted modular arithmetic at once, and analyse them.")


def command(**kwargs):
    return app.command(cls=_Command, **kwargs)


def _default(value) -> str:
    """ [default: value], escaped for rich markup; numbers as the options take them (0, not 0.0)."""
    return f" \\[default: {value:g}]" if isinstance(value, float) else f" \\[default: {value}]"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fastgrok {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")] = False) -> None:
    pass


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def fail_os(e: OSError) -> None:
    """A path that cannot be written or read (a missing or read-only directory, a full disk): one line, no traceback."""
    fail(f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e))


def _call(fn, *args, before_fail=None, **kwargs):
    """Call a library function; bad input (ConfigError) or an unusable path (OSError) becomes a one-line error,
    printed after before_fail() (a progress bar stopped, so that nothing is drawn below the error)."""
    from fastgrok.errors import ConfigError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, OSError) as e:
        if before_fail is not None:
            before_fail()
        if isinstance(e, ConfigError):
            fail(str(e))
        fail_os(e)


@command()
def train(
    xi: Annotated[Optional[str], typer.Option(help="Corrupted fraction of training labels" + _default(HYPER.xi), rich_help_panel=GRID)] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Training fraction of the p^2 pairs" + _default(HYPER.alpha), rich_help_panel=GRID)] = None,
    width: Annotated[Optional[str], typer.Option(help="Hidden width N (a transformer's d_model)" + _default(HYPER.width), rich_help_panel=GRID)] = None,
    d_model: Annotated[Optional[str], typer.Option("--d-model", help="The transformer's width, as --width", rich_help_panel=GRID)] = None,
    wd: Annotated[Optional[str], typer.Option(help="Weight decay" + _default(HYPER.wd), rich_help_panel=GRID)] = None,
    dropout: Annotated[Optional[str], typer.Option(help="Dropout rate: on the pre-activation (MLPs), on the embeddings, attention and MLP outputs (transformer)" + _default(HYPER.dropout), rich_help_panel=GRID)] = None,
    lr: Annotated[Optional[str], typer.Option(help="Learning rate" + _default(HYPER.lr), rich_help_panel=GRID)] = None,
    seed: Annotated[Optional[str], typer.Option(help="Model seed: init, data split and noise" + _default(HYPER.seed), rich_help_panel=GRID)] = None,
    model: Annotated[Optional[str], typer.Option(help="mlp (W phi(U e_m + V e_n), the paper's), deep-mlp (--depth ReLU layers) or transformer" + _default(SETTINGS.model), rich_help_panel=SHARED)] = None,
    op: Annotated[Optional[str], typer.Option(help="add, sub, mul, div, x2y2 (x²+y²), x2xyy2 (x²+xy+y²), or a polynomial in x, y: \"x^2+y^2\", \"xy+x\", \"x/(y^2+1)\"; a comma list of them is a grid axis (`phase --x op`)" + _default(SETTINGS.op), rich_help_panel=SHARED)] = None,
    terms: Annotated[Optional[int], typer.Option(help="Operands of the task: 2 (x, y), or S, x1..xS (the mlp model): add sums them, mul multiplies them, a polynomial names them; the activation is then x^S (--act pow)" + _default(2), rich_help_panel=SHARED)] = None,
    p: Annotated[Optional[int], typer.Option("--p", help="Modulus" + _default(SETTINGS.p), rich_help_panel=SHARED)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (full batch, or minibatches with --batch-size)" + _default(SETTINGS.steps), rich_help_panel=SHARED)] = None,
    act: Annotated[Optional[str], typer.Option(help="Activation: quad (x²), relu or pow (x^S on S operands) (mlp); relu or gelu (deep-mlp, transformer)" + _default(f"{SETTINGS.act} (mlp; pow with --terms 3 or more), relu (the others)"), rich_help_panel=SHARED)] = None,
    loss: Annotated[Optional[str], typer.Option(help="mse or ce" + _default(SETTINGS.loss), rich_help_panel=SHARED)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, adam or sgd" + _default(SETTINGS.optimizer), rich_help_panel=SHARED)] = None,
    betas: Annotated[Optional[str], typer.Option(help="Adam betas" + _default(",".join(f"{b:g}" for b in SETTINGS.betas)), rich_help_panel=SHARED)] = None,
    noise: Annotated[Optional[str], typer.Option(help="uniform (any label, the paper's) or wrong (always a wrong label)" + _default(SETTINGS.noise), rich_help_panel=SHARED)] = None,
    data_seed: Annotated[Optional[int], typer.Option(help="One data split and noise draw for every model" + _default("each model's --seed"), rich_help_panel=SHARED)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log every metric of every model every K steps" + _default(SETTINGS.log_every), rich_help_panel=SHARED)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Minibatch size: each model's training set reshuffled every epoch, the remainder dropped; --steps counts minibatch steps" + _default("full batch"), rich_help_panel=SHARED)] = None,
    batchnorm: Annotated[Optional[bool], typer.Option("--batchnorm/--no-batchnorm", help="BatchNorm1d after the activation (each hidden layer's for deep-mlp), running statistics at evaluation (torch backend)" + _default("off"), rich_help_panel=SHARED)] = None,
    depth: Annotated[Optional[int], typer.Option(help="deep-mlp: hidden ReLU layers" + _default(SETTINGS.depth), rich_help_panel=FAMILY)] = None,
    init: Annotated[Optional[str], typer.Option(help="deep-mlp: he (every layer N(0, 2 / fan_in), the standard parameterisation) or lazy (N(0, 2 / N^(2/3)), a lazier regime: To grok's App. G.3)" + _default(SETTINGS.init), rich_help_panel=FAMILY)] = None,
    layers: Annotated[Optional[int], typer.Option(help="transformer: blocks" + _default(SETTINGS.layers), rich_help_panel=FAMILY)] = None,
    heads: Annotated[Optional[int], typer.Option(help="transformer: attention heads (dividing d_model)" + _default(SETTINGS.heads), rich_help_panel=FAMILY)] = None,
    layernorm: Annotated[Optional[bool], typer.Option("--layernorm/--no-layernorm", help="transformer: LayerNorm before attention, MLP and readout" + _default("off, as the authors'"), rich_help_panel=FAMILY)] = None,
    tie: Annotated[Optional[bool], typer.Option("--tie/--no-tie", help="transformer: weight tying, the token embedding reads out too (no unembedding of its own)" + _default("off, as the authors' Fig. 7a"), rich_help_panel=FAMILY)] = None,
    scale: Annotated[Optional[str], typer.Option(help="transformer: mup (output scale 1/d, attention 1/d_head: the authors' notebook) or sp (1/sqrt(d), 1/sqrt(d_head))" + _default(SETTINGS.scale), rich_help_panel=FAMILY)] = None,
    preset: Annotated[Optional[str], typer.Option(help="A named run (see `fastgrok presets`); options given override it. With no grid option: cpu-demo on a CPU, paper-xi-wd on a GPU")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:K")] = "auto",
    backend: Annotated[str, typer.Option(help="auto (triton on a GPU, torch on a CPU), torch, or triton (on a CPU only under TRITON_INTERPRET=1)")] = "auto",
    precision: Annotated[Optional[str], typer.Option(help=f"Triton dot precision: {', '.join(PRECISIONS)} (parameters and moments stay fp32)" + _default(f"{DEFAULT_PRECISION}, the fastest whose phases agree with fp32's on the validation grid; a resumed run keeps its own"))] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (must be new or empty)" + _default("runs/<timestamp>"))] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run directory from where it stopped (same results as an uninterrupted run)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the options and print the plan (populations, their models, memory and estimated time, from a few measured steps) without training or writing anything")] = False,
    population_size: Annotated[Optional[int], typer.Option(help="At most this many models a population: more, smaller populations, to keep more processes busy (a launcher's: each population trains on one)" + _default("as many as fit the device's memory"))] = None,
    world_size: Annotated[Optional[int], typer.Option(help="With --dry-run: share the populations among this many processes, each on a device like this one, and show which trains each" + _default("the launcher's WORLD_SIZE, or 1"))] = None,
) -> None:
    """Train a grid of models (the product of the grid options) and write a run directory."""
    from fastgrok import distributed, presets
    from fastgrok import train as training

    ops = op if op is not None and "," in op else None  # a list of tasks is a grid axis; one task, the settings'
    op = None if ops is not None else op
    axes = dict(xi=xi, alpha=alpha, width=width, wd=wd, dropout=dropout, lr=lr, seed=seed, op=ops)
    shared = dict(model=model, op=op, terms=terms, p=p, steps=steps, act=act, loss=loss, optimizer=optimizer, betas=betas,
                  noise=noise, data_seed=data_seed, log_every=log_every, batch_size=batch_size, batchnorm=batchnorm,
                  depth=depth, init=init, layers=layers, heads=heads, layernorm=layernorm, scale=scale, tie=tie)
    progress = _Progress()
    if world_size is not None and not dry_run:
        fail("--world-size goes with --dry-run: it shows how a plan's populations would be shared among processes")
    rank, size, _ = distributed.launched()  # under a launcher (torchrun, srun), this process's place
    try:
        if resume is not None:
            _call(presets.check_resume, {**axes, **shared, "d_model": d_model, "preset": preset, "out": out,
                                           "population_size": population_size}, dry_run)
            work = functools.partial(training.resume, resume, device=device, backend=backend, precision=precision)
        else:
            request = _call(presets.resolve, preset, axes, shared, device, d_model=d_model)
            if dry_run:
                if world_size is None and rank > 0:
                    return  # under a launcher process 0 prints the plan, with every process's share
                plan = _call(training.plan, request.grid, request.settings, out, device=device, backend=backend,
                             precision=precision, processes=size if world_size is None else world_size,
                             population_size=population_size)
                _announce(request, planning=True)
                return _print_plan(plan, out)
            progress.request = request
            work = functools.partial(training.train, request.grid, request.settings, out, device=device,
                                     backend=backend, precision=precision, population_size=population_size)
        if rank > 0:  # one of several processes: process 0 reports, for all
            try:
                _call(work)
            except training.Interrupted:
                raise typer.Exit(130) from None
            return
        run = _call(work, on_start=progress.start, on_step=progress.step, before_fail=progress.stop)
    except training.Interrupted as e:
        progress.stop()
        r = e.run
        typer.echo(f"Interrupted: {r.finished} of {r.models} models finished, {len(r.rows) - r.finished} saved "
                   f"part-trained, in {r.out} (config.json says status 'interrupted'; "
                   f"`fastgrok train --resume {r.out}` continues).", err=True)
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    if run.nothing_left:
        for note in run.notes:
            typer.echo(f"Note: {note}.", err=True)
        typer.echo(f"{run.out} is complete: nothing left to train.")
        return
    _print_summary(run, progress.grid)


def _announce(request, planning: bool = False) -> None:
    """Say which preset runs when none was asked for (once every option is known good: an error prints alone)."""
    if not request.default:
        return
    given = f", with {' '.join(request.overrides)}" if request.overrides else ""
    typer.echo(f"No grid given: {'planning' if planning else 'running'} preset {request.preset!r}, {request.about}"
               f"{given}.")
    if request.cpu:
        typer.echo("(Smaller than the paper's p 97, N 500 because this is a CPU; `fastgrok presets` lists others.)")


def _print_plan(plan, out) -> None:
    """--dry-run: the populations `fastgrok train` would step one after another, each one width, its models, the
    range of their training-set sizes, the device memory the planner reserves for it and its estimated time."""
    from rich.console import Console
    from rich.table import Table

    from fastgrok.config import plural
    from fastgrok.planner import bytes_text

    s, models = plan.settings, len(plan.grid)
    console = Console(width=max(100, Console().width))
    for note in plan.notes:
        typer.echo(f"Note: {note}", err=True)
    console.print(f"Plan, nothing trained (--dry-run): {_models(models)} ({plan.grid.describe()}) on {plan.device} "
                  f"({plan.backend}), p {s.p}{_op(plan.grid, s)}, {s.steps} {plural('step', s.steps)}, {s.batching}: "
                  f"{models * s.steps:,} model-steps" + (f" -> {out}" if out is not None else ""), soft_wrap=True)
    shared = plan.processes > 1
    title = (f"{len(plan.populations)} population(s) shared by {plan.processes} processes, each training its own one "
             f"after another" if shared else f"{len(plan.populations)} population(s), trained one after another")
    table = Table(title=title)
    for c in ("population", *(["process"] if shared else []), "width", "models", "training set", "planned memory",
              "estimated time"):
        table.add_column(c, justify="right")
    shown = PLAN_ROWS if len(plan.populations) > PLAN_ROWS + 1 else len(plan.populations)
    for k, pop in enumerate(plan.populations[:shown]):
        low, high = pop.sizes
        span = f"{low:,}" if low == high else f"{low:,}-{high:,}"
        table.add_row(str(k), *([str(pop.rank)] if shared else []), str(pop.width), f"{pop.models:,}", span,
                      bytes_text(pop.memory), _duration(pop.seconds))
    if shown < len(plan.populations):
        rest = plan.populations[shown:]
        table.add_row(f"{shown}-{len(plan.populations) - 1}", *([""] if shared else []), "",
                      f"{sum(p.models for p in rest):,}", "", f"up to {bytes_text(max(p.memory for p in rest))}",
                      _duration(sum(p.seconds for p in rest)))
    console.print(table)
    if shared:
        ranks = Table(title="per process (the run takes as long as the slowest)")
        for c in ("process", "populations", "models", "largest memory", "estimated time"):
            ranks.add_column(c, justify="right")
        for r, seconds in enumerate(plan.rank_seconds):
            mine = [p for p in plan.populations if p.rank == r]
            ranks.add_row(str(r), f"{len(mine):,}", f"{sum(p.models for p in mine):,}",
                          bytes_text(max((p.memory for p in mine), default=0)), _duration(seconds))
        console.print(ranks)
    console.print(f"About {_duration(plan.seconds)} in all on this {plan.device.type} device, estimated from "
                  f"{plan.probe} (more when the machine is busy). A population may take {bytes_text(plan.budget)} of "
                  f"it ({plan.budget_share}). The run writes about {bytes_text(sum(plan.disk))} (weights "
                  f"{bytes_text(plan.disk[0])}, history {bytes_text(plan.disk[1])}).", soft_wrap=True)


PLAN_ROWS = 30  # populations --dry-run lists one by one; the rest in a row


def _duration(seconds: float) -> str:
    """A time to the precision an estimate has: 45 s, 12 min, 3.4 h."""
    if seconds != seconds:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Progress:
    """What `train` shows while it runs: what trains (printed once every option is good), then a progress bar,
    or on a log file a line a minute."""

    def __init__(self):
        self.request, self.bar, self.grid = None, None, None

    def start(self, start) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.text import Text

        from fastgrok.config import plural

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{_rate(task.speed or 0)} model-steps/s", style="cyan")

        if self.request is not None:
            _announce(self.request)
        for note in start.notes:
            typer.echo(f"Note: {note}", err=True)
        self.grid, s = start.grid, start.settings
        self.console = console = Console(stderr=True)
        verb = (f"Resuming: {_models(start.models)} of {len(start.grid):,} left" if start.resumed
                else f"Training {_models(start.models)}")
        console.print(f"{verb} ({start.grid.describe()}) on {start.device} ({start.backend}), p {s.p}{_op(start.grid, s)}, "
                      f"{s.steps} {plural('step', s.steps)}, {s.batching}, {start.populations} population(s) "
                      f"-> {start.out}", soft_wrap=True)
        # one line of an 80-column terminal (the line above says what trains)
        self.bar = Progress(BarColumn(bar_width=15), TextColumn("{task.percentage:>3.0f}%"),
                            TextColumn("step {task.fields[step]}"), Rate(), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=console)
        self.bar.start()
        self.task = self.bar.add_task("train", total=start.model_steps, step=f"0/{s.steps}")
        self.steps, self.printed_at, self.plain = s.steps, time.monotonic(), not console.is_terminal

    def step(self, models: int, step: int) -> None:
        self.bar.update(self.task, advance=models, step=f"{step}/{self.steps}")
        # Redirected to a file (a batch job's log), the bar is drawn only at the end: print a line now and then.
        if self.plain and time.monotonic() - self.printed_at >= PLAIN_PROGRESS_SECONDS:
            self.printed_at = time.monotonic()
            t = self.bar.tasks[0]
            eta = f"{datetime.timedelta(seconds=round(t.time_remaining))}" if t.time_remaining is not None else "?"
            self.console.print(f"train {t.percentage:.0f}% step {step}/{self.steps}, {_rate(t.speed or 0)} "
                               f"model-steps/s, elapsed {datetime.timedelta(seconds=round(t.elapsed or 0))}, eta {eta}",
                               soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _op(grid, settings) -> str:
    """The run's task, for a line that says what trains: its op, unless the grid varies it (then the grid says)."""
    return f", op {settings.op}" if grid.axes["op"] == [None] else ""


def _rate(per_s: float) -> str:
    """Whole numbers with thousands separators, and slow rates (a big p on a CPU) to 2 digits rather than as 0."""
    return f"{per_s:,.0f}" if per_s >= 10 else f"{per_s:.2g}"


def _models(n: int) -> str:
    from fastgrok.config import plural

    return f"{n:,} {plural('model', n)}"


def _cell(value) -> str:
    """An accuracy as a table shows it: three decimals, "-" where there is none (an empty subset)."""
    return "-" if value is None else f"{value:.3f}"


def _print_summary(run, grid, console=None) -> None:
    """The models of a finished run: each model's accuracies and phase (up to 40 of them), else a count per phase."""
    from collections import Counter
    from statistics import median

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from fastgrok.config import axis_text, plural
    from fastgrok.phases import PHASES

    console = Console() if console is None else console
    varying = [a for a, v in grid.axes.items() if len(v) > 1]
    if len(run.rows) <= 40:
        table = Table(title=_models(len(run.rows)), box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0),
                      caption="mem.: corrupted examples at their corrupted label; inv.: at their true label")
        for c in ("model", *varying, "train", "test", "clean", "mem.", "inv.", "90% test\nat step", "phase"):
            table.add_column(c, justify="right" if c != "phase" else "left", no_wrap=True)
        for r in run.rows:
            acc = [_cell(r[k]) for k in ("train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc")]
            table.add_row(str(r.model), *(axis_text(r[a]) for a in varying), *acc,
                          f"{r.test90_step:,}" if r.test90_step is not None else "-", r.phase)
        # as wide as its cells need, past the terminal if it must: squeezed, rich would cut the numbers to "0.1…"
        # and the phases to "forgetti…"
        console.width = max(console.width, console.measure(table, options=console.options.update_width(10_000)).maximum)
    else:
        console.width = max(100, console.width)
        counts = Counter(r.phase for r in run.rows)
        table = Table(title=f"{len(run.rows):,} models by phase")
        for c in ("phase", "models", "reached 90% test", "at step (median)"):
            table.add_column(c, justify="left" if c == "phase" else "right")
        for name in (*PHASES, "diverged"):
            if counts.get(name):
                steps = [r.test90_step for r in run.rows if r.phase == name and r.test90_step is not None]
                table.add_row(name, f"{counts[name]:,}", f"{len(steps):,}",
                              f"{median(steps):,.0f}" if steps else "-")
    console.print(table)
    console.print(f"{run.model_steps:,} {plural('model-step', run.model_steps)} in {run.seconds:.1f} s "
                  f"({_rate(run.model_steps / max(run.seconds, 1e-9))} model-steps/s). Results: {run.out}",
                  soft_wrap=True)
    console.print(f"Next: fastgrok phase {run.out}; fastgrok plot {run.out} --models all; fastgrok ipr {run.out}",
                  soft_wrap=True, highlight=False)


@command()
def presets() -> None:
    """List the named runs `fastgrok train --preset` knows."""
    from rich.console import Console
    from rich.table import Table

    from fastgrok.presets import PRESETS

    table = Table(title="presets")
    for c in ("name", "grid", "what"):
        table.add_column(c)
    for name, pr in PRESETS.items():
        spec = " ".join(f"--{k} {v}" for k, v in {**pr.axes, **pr.settings}.items())
        table.add_row(name, spec, pr.about)
    Console().print(table)


@command()
def bench(
    width: Annotated[str, typer.Option(help="Widths N, comma list")] = "128,500",
    models: Annotated[str, typer.Option(help="Population sizes B, comma list; 'max' = what fits in memory")] = "1,16",
    variants: Annotated[Optional[str], typer.Option(help="Comma list from torch, torch-tf32, torch-compile, torch-vmap, torch-vmap-compile, triton-fp32, triton-tf32, triton-tf32x3, triton-bf16" + _default("torch and torch-vmap on a CPU, all the model has on a GPU"))] = None,
    model: Annotated[str, typer.Option(help="mlp, deep-mlp or transformer, at its default settings but for the options below")] = SETTINGS.model,
    p: Annotated[int, typer.Option("--p", help="Modulus")] = SETTINGS.p,
    depth: Annotated[Optional[int], typer.Option(help="deep-mlp: hidden ReLU layers" + _default(SETTINGS.depth))] = None,
    layers: Annotated[Optional[int], typer.Option(help="transformer: blocks" + _default(SETTINGS.layers))] = None,
    heads: Annotated[Optional[int], typer.Option(help="transformer: attention heads" + _default(SETTINGS.heads))] = None,
    alpha: Annotated[float, typer.Option(help="Training fraction")] = HYPER.alpha,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:K")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here (rewritten after every result), and their figure beside it")] = None,
) -> None:
    """Model-steps/s of the reference.py loop and the population backends, side by side, checked first."""
    from fastgrok import bench as benchmark
    from fastgrok.config import parse_axis, plural

    widths = _call(parse_axis, "width", width)
    sizes = [b.strip() for b in models.split(",")]
    chosen = tuple(v.strip() for v in variants.split(",")) if variants else None
    try:
        family = {k: v for k, v in dict(depth=depth, layers=layers, heads=heads).items() if v is not None}
        _call(benchmark.run, widths, sizes, p=p, alpha=alpha, device=device, variants=chosen, out=out, model=model,
              family_settings=family)
    except benchmark.Interrupted as e:
        done = len(e.report["results"])
        kept = f", written to {out} and {out.with_suffix('.png')} (marked \"interrupted\")" if out else ""
        typer.echo(f"Interrupted after {done} {plural('result', done)}{kept}.", err=True)
        raise typer.Exit(130) from None
    if out is not None:
        typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


RunArg = Annotated[Path, typer.Argument(help="A run directory written by `fastgrok train` or `fastgrok analytic`")]
ModelsOpt = Annotated[Optional[str], typer.Option(help="Model ids (0,4,9), a phase name, or all")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:K")]


def _with_progress(fn, *args, units: str, **kwargs):
    """_call(fn) with a progress bar (on a terminal) fed by fn's progress(done, total) reports of `units`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)  # a bar only on a terminal: a log file would get its last frame or a blank line
    with Progress(BarColumn(bar_width=15), MofNCompleteColumn(), TextColumn(units), TextColumn("eta"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(units, total=None)
        return _call(fn, *args, progress=lambda done, total: bar.update(task, completed=done, total=total), **kwargs)


def _note_unfinished(run: Path) -> None:
    """After an analysis of a run that is not complete, say so (stderr): its results are not the final ones."""
    from fastgrok import analysis

    note = _call(analysis.unfinished, run)
    if note:
        typer.echo(f"note: {note}", err=True)


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("phase", "model") else "right", no_wrap=True)
    for row in rows:  # an empty subset's metric (memorized at xi 0) is None or NaN: shown as "-"
        table.add_row(*(_cell(None if v != v else v) if isinstance(v, float) or v is None else str(v) for v in row))
    Console(width=max(100, Console().width)).print(table)


@command()
def ipr(
    run: RunArg,
    models: ModelsOpt = None,
    fft: Annotated[str, typer.Option(help="rfft (the paper's |rfft|, keeps DC) or full")] = "rfft",
    threshold: Annotated[float, typer.Option(help="IPR above which a neuron counts as high-IPR (periodic)")] = 0.5,
    basis: Annotated[Optional[str], typer.Option(help="The residues' order for the Fourier transform: index, or log (by discrete logarithm, residue 0 left out: where multiplication is periodic)" + _default("log for --op mul, else index"))] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Per-neuron IPR of U, V, W and their mean: ipr.parquet, ipr-hist.png, ipr-spectra.png, IPR columns in models.csv;
    with BatchNorm also each neuron's BatchNorm weight, its rank correlation with the IPR and ipr-vs-bn.png."""
    from fastgrok import analysis
    from fastgrok.results import read_config

    summary = _with_progress(analysis.ipr, run, fft=fft, threshold=threshold, models=models, device=device,
                             units="models", basis=basis)
    _table(f"neuron IPR by phase (|{fft}|, high = IPR > {threshold:g})", ["phase", "models", "mean IPR", "high-IPR fraction"],
           [[p, s["models"], s["mean_ipr"], s["high_ipr_fraction"]] for p, s in summary.items()])
    figures = [run / "ipr-spectra.png", run / "ipr-vs-bn.png"]  # not drawn when no model shown has a live neuron
    shared = read_config(run)["settings"]
    bn = (", bn_ipr_correlation" + (", bn_out_ipr_correlation" if shared.get("model") == "deep-mlp" else "")
          if shared.get("batchnorm") else "")
    typer.echo(f"wrote {run / 'ipr.parquet'}, {run / 'ipr-hist.png'}" + "".join(f", {f}" for f in figures if f.is_file())
               + f"; models.csv has mean_ipr, high_ipr_fraction, dead_neurons{bn}")
    _note_unfinished(run)


@command()
def prune(
    run: RunArg,
    models: ModelsOpt = None,
    order: Annotated[str, typer.Option(help="low (lowest IPR first), high, or random")] = "low",
    every: Annotated[Optional[int], typer.Option(help="Measure after every k-th pruned neuron" + _default(1))] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random order")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Cumulative pruning by IPR without retraining; every metric after each step: prune-ORDER.parquet and .png."""
    from fastgrok import analysis

    curves = _with_progress(analysis.prune, run, order=order, models=models, every=every, seed=seed, device=device,
                            units="model-levels")
    rows = []
    for m, c in list(curves.items())[:40]:
        half = int(len(c["fraction"]) // 2)
        rows.append([m, c["test_acc"][0], c["corrupted_acc"][0], c["test_acc"][half], c["corrupted_acc"][half],
                     float(c["fraction"][half])])
    _table(f"pruning {analysis.ORDERS[order]} ({len(curves)} models)", ["model", "test before", "memorized before",
           "test at half", "memorized at half", "fraction"], rows)
    typer.echo(f"wrote {run / f'prune-{order}.parquet'}, {run / f'prune-{order}.png'}")
    _note_unfinished(run)


@command()
def phase(
    run: RunArg,
    x: Annotated[Optional[str], typer.Option("--x", help="Grid axis on the horizontal" + _default("the first the grid varies of xi, alpha, width, wd, dropout, lr"))] = None,
    y: Annotated[Optional[str], typer.Option("--y", help="Grid axis on the vertical" + _default("the next one"))] = None,
    metric: Annotated[Optional[str], typer.Option(help="Draw this models.csv column (mean over seeds) instead of the phase: train_acc, test_acc, clean_acc, corrupted_acc (memorized), inverted_acc, train_loss, test_loss, train90_step, test90_step (first logged step at 90%; models that never got there left out), or after `fastgrok ipr` mean_ipr, high_ipr_fraction, dead_neurons")] = None,
) -> None:
    """Phase-diagram heatmaps over two grid axes (a panel per value of the others; seeds by majority), or of one metric."""
    from collections import Counter

    from fastgrok import analysis
    from fastgrok.config import plural

    drawn = _call(analysis.diagram, run, x, y, metric)
    cells = f"{len(drawn.table)} {plural('cell', len(drawn.table))} of {drawn.y} x {drawn.x}"
    if metric is not None:
        values = [r[metric] for r in drawn.table if r[metric] == r[metric]]
        span = f"{min(values):.3g} to {max(values):.3g}" if values else "no values"
        typer.echo(f"{cells}: {metric} (mean over seeds, {drawn.left_out} left out) {span}")
    else:
        counts = Counter(r["phase"] for r in drawn.table)
        split = sum(r["agreement"] < 1 for r in drawn.table)
        _table(cells + (f" ({split} with seeds disagreeing)" if split else ""), ["phase", "cells"],
               [[p, n] for p, n in counts.most_common()])
    typer.echo(f"wrote {drawn.path} and .csv")
    for note in drawn.notes:
        typer.echo(f"note: {note}", err=True)
    _note_unfinished(run)


@command()
def learnability(
    run: RunArg,
    level: Annotated[float, typer.Option(help="Test accuracy that counts as generalising (for a majority of seeds)")] = 0.9,
) -> None:
    """Which tasks of a run (its --op list) generalised, and from which alpha, beside the class the sequel's
    hypothesis predicts (learnable: h(g1(x) + g2(y))): learnability.csv and .png."""
    from fastgrok import analysis

    table = _call(analysis.learnability, run, level)
    agree = [r for r in table if r["predicted"] != "-"]
    same = sum(r["generalises"] == (r["predicted"] == "learnable") for r in agree)
    _table(f"test accuracy >= {level:g} (a majority of seeds) at some alpha", ["op", "predicted", "generalises",
           "from alpha"], [[r["op"], r["predicted"], "yes" if r["generalises"] else "no",
                            "-" if r["from_alpha"] is None else f"{r['from_alpha']:g}"] for r in table])
    if agree:
        typer.echo(f"{same} of {len(agree)} as predicted")
    typer.echo(f"wrote {run / 'learnability.csv'} and .png")
    _note_unfinished(run)


@command()
def reproduce(
    quick: Annotated[bool, typer.Option("--quick", help="Reduced sizes that a CPU trains in minutes (the full size is the papers')")] = False,
    out: Annotated[Path, typer.Option(help="The folder of the experiments' runs and the report")] = Path("reproduce"),
    only: Annotated[Optional[str], typer.Option(help="Comma list of experiments: " + ", ".join(EXPERIMENTS) + _default("all"))] = None,
    device: DeviceOpt = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what each unfinished experiment would train and the planner's time estimate on this device, from a few measured steps, without training or writing anything")] = False,
) -> None:
    """Run the papers' experiments as runs in one folder (a second call resumes what is unfinished) and check each
    claim: report.md and report.html."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from fastgrok import reproduce as repro
    from fastgrok import train as training

    names = _call(repro._selected, only)
    if dry_run:
        table = _call(repro.plan_experiments, names, out, quick, device)
        _table(f"fastgrok reproduce{' --quick' if quick else ''}: what is left to train", ["experiment", "runs", "models",
               "model-steps", "estimated time"], [[t["experiment"], t["runs"], f"{t['models']:,}", f"{t['model_steps']:,}",
                                                   _duration(t["seconds"])] for t in table])
        typer.echo(f"{sum(t['model_steps'] for t in table):,} model-steps: about {_duration(sum(t['seconds'] for t in table))} "
                   "in all on this device, the planner's estimate from a few measured steps of each run (analyses "
                   "not counted).")
        return
    total = _call(repro.planned_steps, names, out, quick, device)
    bar = Progress(TextColumn("{task.fields[done]}/{task.fields[of]} experiments"), BarColumn(bar_width=20),
                   TextColumn("{task.percentage:>3.0f}% of {task.total:,} model-steps"), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
    task = bar.add_task("reproduce", total=max(total, 1), done=0, of=len(names))
    finished = []

    def experiment(name: str, what: str) -> None:
        finished.append(name)
        bar.update(task, done=len(finished))
        bar.console.print(f"{name}: {what}")

    bar.start()
    try:
        md, page = _call(repro.reproduce, out, quick=quick, only=only, device=device, on_experiment=experiment,
                         on_step=lambda models, step: bar.update(task, advance=models), before_fail=bar.stop)
    except training.Interrupted:
        bar.stop()
        typer.echo(f"Interrupted: {len(finished)} experiment(s) finished, kept in {out}; {out / 'report.md'} reports "
                   "them. Run the same command again to resume.", err=True)
        raise typer.Exit(130) from None
    finally:
        bar.stop()
    table = repro.verdicts(out, names, quick)
    typer.echo(f"{sum(t['verdict'] == 'holds' for t in table)} of {len(table)} claims hold:")
    for t in table:
        typer.echo(f"  {t['verdict']:8} {t['claim'].experiment} ({t['claim'].where}): {t['numbers']}")
    typer.echo(f"wrote {md} and {page}")


@command()
def plot(run: RunArg, models: Annotated[Optional[str], typer.Option(help="Model ids (0,4,9): a figure per model; a phase name, or all for each phase: the mean over its models with a band from the 10th to the 90th percentile" + _default("the first model of each phase"))] = None) -> None:
    """Training curves: accuracies (train, test, clean, memorized, inverted), losses and mean IPR against step."""
    from fastgrok import analysis

    for path in _call(analysis.curves, run, models=models):
        typer.echo(f"wrote {path}")
    _note_unfinished(run)


@command()
def check(run: RunArg) -> None:
    """Check a run directory's files without loading its weights: what it holds, and each file that is missing or
    damaged, with the fix. Exit code 2 when a population cannot be used."""
    from fastgrok.results import inspect_run

    found = _call(inspect_run, run)
    for line in found.report(run):
        typer.echo(line)
    if found.problems:
        raise typer.Exit(2)


@command()
def analytic(
    p: Annotated[int, typer.Option("--p", help="Modulus")] = SETTINGS.p,
    width: Annotated[str, typer.Option(help="Width, or a grid of widths like 10:400:40")] = str(HYPER.width),
    op: Annotated[str, typer.Option(help="add (Gromov 2023; of --terms S, the sequel's eq. 2) or mul (through discrete logarithms, a prime p; the sequel's eq. 6)")] = "add",
    terms: Annotated[int, typer.Option(help="Operands: x^S activation; the width needed grows exponentially with S")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the random frequencies and phases")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Run directory to save it in" + _default("runs/<timestamp>"))] = None,
    device: DeviceOpt = "auto",
) -> None:
    """An analytic solution (addition of S terms, or multiplication) at each width: its accuracy, saved as a run
    for ipr and prune."""
    from fastgrok.analytic import analytic_run

    rows, out = _call(analytic_run, out, p=p, widths=width, op=op, seed=seed, device=device, terms=terms)
    what = f"{op} of {terms} operands" if terms != 2 else op
    _table(f"analytic solution of {what}, p {p}", ["width", f"accuracy (all {p}^{terms} inputs)", "phase"],
           [[r["width"], r["all_acc"], r.phase] for r in rows])
    typer.echo(f"wrote {out}")


@command()
def experts(
    op: Annotated[str, typer.Option(help="Polynomials in x and y without division, a comma list (2x^4y+x^2y^2+3xy^3)")],
    p: Annotated[str, typer.Option("--p", help="Prime moduli, a comma list")] = "97",
    width: Annotated[int, typer.Option(help="Width of each monomial's multiplication expert")] = 500,
    add_width: Annotated[int, typer.Option(help="Width of the addition expert")] = 2000,
    beta: Annotated[float, typer.Option(help="Inverse temperature of the softmax between the experts")] = 100.0,
    seed: Annotated[int, typer.Option(help="Seed of the experts' random frequencies and phases")] = 0,
) -> None:
    """The sequel's construction for any polynomial (its Sec. 4): a multiplication expert per monomial, a softmax,
    then an addition expert; its accuracy and MSE on all p^2 inputs."""
    from fastgrok.analytic import experts as build

    from fastgrok.errors import ConfigError

    def moduli() -> list[int]:
        try:
            return [int(v) for v in p.split(",")]
        except ValueError:
            raise ConfigError(f"--p takes prime moduli like 97,23, got {p!r}") from None

    ops, rows = [o.strip() for o in op.split(",") if o.strip()], []
    for o in ops:
        for q in _call(moduli):
            result = _call(build, o, q, (width, add_width), seed, beta)
            rows.append([o, q, len(result["monomials"]), result["acc"], f"{result['mse']:.6f}"])
    _table(f"experts: multiplication N {width} per monomial, addition N {add_width}, beta {beta:g}",
           ["polynomial", "p", "monomials", "accuracy (all p^2 inputs)", "MSE"], rows)
