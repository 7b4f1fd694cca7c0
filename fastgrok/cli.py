"""The fastgrok command line. Commands build a config and call the library; heavy imports stay inside them."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fastgrok import __version__

app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True, add_completion=False,
                  help="Train thousands of one-hot MLPs on corrupted modular arithmetic at once, and analyse them.")

GRID = "Grid (each: a comma list 0,0.35 or start:stop:count 0:0.9:19)"
SHARED = "Shared settings"
PLAIN_PROGRESS_SECONDS = 60.0  # a progress line this often when stderr is not a terminal


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


@app.command()
def train(
    xi: Annotated[Optional[str], typer.Option(help="Corrupted fraction of training labels \\[default: 0]", rich_help_panel=GRID)] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Training fraction of the p^2 pairs \\[default: 0.5]", rich_help_panel=GRID)] = None,
    width: Annotated[Optional[str], typer.Option(help="Hidden width N \\[default: 500]", rich_help_panel=GRID)] = None,
    wd: Annotated[Optional[str], typer.Option(help="Weight decay \\[default: 0]", rich_help_panel=GRID)] = None,
    dropout: Annotated[Optional[str], typer.Option(help="Dropout rate on the pre-activation \\[default: 0]", rich_help_panel=GRID)] = None,
    lr: Annotated[Optional[str], typer.Option(help="Learning rate \\[default: 0.01]", rich_help_panel=GRID)] = None,
    seed: Annotated[Optional[str], typer.Option(help="Model seed: init, data split and noise \\[default: 0]", rich_help_panel=GRID)] = None,
    op: Annotated[Optional[str], typer.Option(help="add, sub, mul, div, x2y2 (m²+n²), x2xyy2 (m²+mn+n²) \\[default: add]", rich_help_panel=SHARED)] = None,
    p: Annotated[Optional[int], typer.Option("--p", help="Modulus \\[default: 97]", rich_help_panel=SHARED)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Full-batch training steps \\[default: 2000]", rich_help_panel=SHARED)] = None,
    act: Annotated[Optional[str], typer.Option(help="Activation: quad (x²) or relu \\[default: quad]", rich_help_panel=SHARED)] = None,
    loss: Annotated[Optional[str], typer.Option(help="mse or ce \\[default: mse]", rich_help_panel=SHARED)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, adam or sgd \\[default: adamw, betas 0.9,0.98]", rich_help_panel=SHARED)] = None,
    betas: Annotated[Optional[str], typer.Option(help="Adam betas \\[default: 0.9,0.98]", rich_help_panel=SHARED)] = None,
    noise: Annotated[Optional[str], typer.Option(help="uniform (any label, the paper's) or wrong (always a wrong label) \\[default: uniform]", rich_help_panel=SHARED)] = None,
    data_seed: Annotated[Optional[int], typer.Option(help="One data split and noise draw for every model \\[default: each model's --seed]", rich_help_panel=SHARED)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log every metric of every model every K steps \\[default: 100]", rich_help_panel=SHARED)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Minibatch size: each model's training set reshuffled every epoch, the remainder dropped; --steps counts minibatch steps \\[default: full batch]", rich_help_panel=SHARED)] = None,
    batchnorm: Annotated[Optional[bool], typer.Option("--batchnorm/--no-batchnorm", help="BatchNorm1d after the activation, running statistics at evaluation (torch backend) \\[default: off]", rich_help_panel=SHARED)] = None,
    preset: Annotated[Optional[str], typer.Option(help="A named run (see `fastgrok presets`); options given override it. With no grid option: cpu-demo on a CPU, paper-xi-wd on a GPU")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:K")] = "auto",
    backend: Annotated[str, typer.Option(help="auto (triton on a GPU, torch on a CPU), torch, or triton (on a CPU only under TRITON_INTERPRET=1)")] = "auto",
    precision: Annotated[Optional[str], typer.Option(help="Triton dot precision: fp32, tf32, tf32x3 or bf16 (parameters and moments stay fp32) \\[default: tf32, the fastest whose phases agree with fp32's on the validation grid; a resumed run keeps its own]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (must be new or empty) \\[default: runs/<timestamp>]")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run directory from where it stopped (same results as an uninterrupted run)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the options and print the plan (populations, their models and memory) without training or writing anything")] = False,
) -> None:
    """Train a grid of models (the product of the grid options) and write a run directory."""
    from fastgrok.errors import ConfigError
    from fastgrok.presets import PRESETS, default_preset
    from fastgrok.train import resolve_device

    axes = dict(xi=xi, alpha=alpha, width=width, wd=wd, dropout=dropout, lr=lr, seed=seed)
    shared = dict(op=op, p=p, steps=steps, act=act, loss=loss, optimizer=optimizer, noise=noise,
                  data_seed=data_seed, log_every=log_every, batch_size=batch_size, batchnorm=batchnorm)
    try:
        dev = resolve_device(device)
        betas = _betas(betas)
        if resume is not None:
            given = [k for k, v in {**axes, **shared, "betas": betas, "preset": preset, "out": out}.items() if v is not None]
            if given:
                raise ConfigError(f"--resume takes the grid and settings from the run; drop --{given[0].replace('_', '-')}")
            if dry_run:
                raise ConfigError("--dry-run plans a new run; drop --resume")
            return _resume(resume, dev, backend, precision)
        by_default = preset is None and all(v is None for v in (*axes.values(), op, p, steps))
        if by_default:
            preset = default_preset(dev.type)
        chosen = PRESETS.get(preset) if preset is not None else None
        if preset is not None and chosen is None:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        _run(axes, shared, betas, chosen, dev, backend, precision, out, announce=preset if by_default else None,
             dry_run=dry_run)
    except ConfigError as e:
        fail(str(e))
    except OSError as e:
        fail_os(e)


def _betas(text: str | None) -> tuple[float, float] | None:
    from fastgrok.errors import ConfigError

    if text is None:
        return None
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--betas: cannot read {text!r}; give two numbers like 0.9,0.98") from None
    if len(betas) != 2:
        raise ConfigError(f"--betas takes two numbers, got {text!r}")
    return betas


def _run(axes, shared, betas, preset, dev, backend, precision, out, announce: str | None = None,
         dry_run: bool = False) -> None:
    from fastgrok.backends import make_backend
    from fastgrok.config import Grid, Settings
    from fastgrok.errors import ConfigError
    from fastgrok.population import plan
    from fastgrok.results import check_out_dir, default_out_dir

    if preset is not None:
        axes = {k: v if v is not None else preset.axes.get(k) for k, v in axes.items()}
        shared = {k: v if v is not None else preset.settings.get(k) for k, v in shared.items()}
    settings_kwargs = {k: v for k, v in shared.items() if v is not None}
    if betas is not None:
        settings_kwargs["betas"] = betas
    settings = Settings(**settings_kwargs)
    settings.check()
    grid = Grid.parse(axes)
    if out is not None:
        check_out_dir(out)
    engine = make_backend(backend, dev, precision, settings)
    engine.check(settings)
    _note_precision(precision, engine)
    populations = plan(grid.models(), settings, dev, backend=engine.name)
    if not dry_run:
        if out is None:
            out = default_out_dir()  # once every option is known good, so a refused run leaves no empty directory
        out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, before the progress bar
    if announce is not None:  # the default preset, said once every option is known good: an error prints alone
        typer.echo(f"No grid given: {'planning' if dry_run else 'running'} preset {announce!r}, {preset.about}.")
        if dev.type == "cpu":
            typer.echo("(Smaller than the paper's p 97, N 500 because this is a CPU; `fastgrok presets` lists others.)")
    if dry_run:
        return _print_plan(grid, settings, dev, engine, populations, out)
    _train_with_progress(grid, settings, out, dev, engine, len(grid), populations=populations)


def _print_plan(grid, settings, dev, engine, populations, out) -> None:
    """--dry-run: the populations `fastgrok train` would step one after another, each one width, its models, the
    range of their training-set sizes and the device memory the planner reserves for it."""
    from rich.console import Console
    from rich.table import Table

    from fastgrok.data import pair_count, train_size
    from fastgrok.population import BUDGETS, memory_budget, population_bytes

    hypers, pairs = grid.models(), pair_count(settings.op, settings.p)
    steps = len(hypers) * settings.steps
    console = Console(width=max(100, Console().width))
    console.print(f"Plan, nothing trained (--dry-run): {_models(len(hypers))} ({grid.describe()}) on {dev} "
                  f"({engine.name}), p {settings.p}, op {settings.op}, {settings.steps} steps, {settings.batching}: "
                  f"{steps:,} model-steps" + (f" -> {out}" if out is not None else ""), soft_wrap=True)
    table = Table(title=f"{len(populations)} population(s), trained one after another")
    for c in ("population", "width", "models", "training set", "planned memory"):
        table.add_column(c, justify="right")
    for k, ids in enumerate(populations):
        width = hypers[ids[0]].width
        sizes = [train_size(pairs, hypers[i].alpha) for i in ids]
        memory = population_bytes(settings, width, max(sizes), pairs, len(ids), engine.name,
                                  any(hypers[i].dropout > 0 for i in ids), dev)
        span = f"{min(sizes):,}" if min(sizes) == max(sizes) else f"{min(sizes):,}-{max(sizes):,}"
        table.add_row(str(k), str(width), f"{len(ids):,}", span, _size(memory))
    console.print(table)
    console.print(f"A population may take {_size(memory_budget(dev))} of this {dev.type} device "
                  f"({BUDGETS[dev.type][1]}).")


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that leaves a whole part: 3.2 GiB, 940.5 MiB, 12.0 KiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.1f} {unit}"
    return f"{nbytes} B"


def _resume(run_dir: Path, dev, backend, precision) -> None:
    from fastgrok.backends import make_backend
    from fastgrok.config import Grid
    from fastgrok.results import check_not_busy, read_config, read_models, settings_of

    config = read_config(run_dir)
    check_not_busy(run_dir)
    grid, settings = Grid(config["grid"]), settings_of(config)
    trained_on = config.get("backend", "")
    given = precision
    if precision is None and trained_on.startswith("triton-"):  # the precision the run was trained in
        precision = trained_on.removeprefix("triton-").split("-")[0]
    left = len(grid) - sum(r["steps"] == settings.steps for r in read_models(run_dir))
    if config["status"] == "complete" or left == 0:
        typer.echo(f"{run_dir} is complete: nothing left to train.")
        return
    # models of a population saved with its state continue from its step, the others start again
    steps_done = sum(len(w["models"]) * w["steps"] for w in config.get("written", [])
                     if w.get("state") and w["steps"] < settings.steps)
    engine = make_backend(backend, dev, precision, settings)
    _note_precision(given, engine)
    _train_with_progress(grid, settings, run_dir, dev, engine, left, resume=True, steps_done=steps_done)


def _note_precision(given: str | None, engine) -> None:
    """A --precision the chosen backend does not use is said, not silently dropped."""
    if given is not None and engine.name == "torch":
        typer.echo(f"Note: --precision {given} picks the Triton kernels' dot precision; the torch backend "
                   "running here computes in fp32.", err=True)


def _train_with_progress(grid, settings, out, dev, engine, models: int, populations=None, resume: bool = False,
                         steps_done: int = 0) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    from fastgrok.config import plural
    from fastgrok.train import Interrupted, train

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{_rate(task.speed or 0)} model-steps/s", style="cyan")

    console = Console(stderr=True)
    verb = f"Resuming: {_models(models)} of {len(grid):,} left" if resume else f"Training {_models(models)}"
    console.print(f"{verb} ({grid.describe()}) on {dev} ({engine.name}), p {settings.p}, op {settings.op}, "
                  f"{settings.steps} {plural('step', settings.steps)}, {settings.batching}"
                  + (f", {len(populations)} population(s)" if populations else "") + f" -> {out}", soft_wrap=True)
    # one line of an 80-column terminal (the line above says what trains)
    with Progress(BarColumn(bar_width=15), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("step {task.fields[step]}"), Rate(), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=models * settings.steps - steps_done, step=f"0/{settings.steps}")
        printed_at, plain = time.monotonic(), not console.is_terminal

        def on_step(k: int, step: int) -> None:
            nonlocal printed_at
            bar.update(task, advance=k, step=f"{step}/{settings.steps}")
            # Redirected to a file (a batch job's log), the bar is drawn only at the end: print a line now and then.
            if plain and time.monotonic() - printed_at >= PLAIN_PROGRESS_SECONDS:
                printed_at = time.monotonic()
                t = bar.tasks[0]
                eta = f"{datetime.timedelta(seconds=round(t.time_remaining))}" if t.time_remaining is not None else "?"
                console.print(f"train {t.percentage:.0f}% step {step}/{settings.steps}, "
                              f"{_rate(t.speed or 0)} model-steps/s, "
                              f"elapsed {datetime.timedelta(seconds=round(t.elapsed or 0))}, eta {eta}",
                              soft_wrap=True)

        try:
            run = train(grid, settings, out, device=str(dev), backend=engine, populations=populations, resume=resume,
                        on_step=on_step)
        except Interrupted as e:
            bar.stop()
            finished = sum(r["steps"] == settings.steps for r in e.run.rows)
            typer.echo(f"Interrupted: {finished} of {len(grid)} models finished, {len(e.run.rows) - finished} saved "
                       f"part-trained, in {out} (config.json says status 'interrupted'; "
                       f"`fastgrok train --resume {out}` continues).", err=True)
            raise typer.Exit(130) from None
    _print_summary(run, grid, Console(width=max(100, Console().width)))


def _rate(per_s: float) -> str:
    """Whole numbers with thousands separators, and slow rates (a big p on a CPU) to 2 digits rather than as 0."""
    return f"{per_s:,.0f}" if per_s >= 10 else f"{per_s:.2g}"


def _models(n: int) -> str:
    from fastgrok.config import plural

    return f"{n:,} {plural('model', n)}"


def _print_summary(run, grid, console) -> None:
    from collections import Counter
    from statistics import median

    from rich.table import Table

    from fastgrok.config import plural
    from fastgrok.phases import PHASES

    varying = [a for a, v in grid.axes.items() if len(v) > 1]
    # the first logged step at 90% test accuracy (models.csv's test90_step): blank in a new row when never reached,
    # NaN when read back from models.csv (a resumed run), missing in a run from before the column
    reached = {r["model"]: int(r["test90_step"]) for r in run.rows if r.get("test90_step", "") not in ("", None)
               and r["test90_step"] == r["test90_step"]}
    if len(run.rows) <= 40:
        table = Table(title=_models(len(run.rows)))
        for c in ("model", *varying, "train", "test", "clean", "memorised", "inverted", "test 90%\nat step", "phase"):
            table.add_column(c, justify="right" if c != "phase" else "left", no_wrap=True)
        for r in run.rows:
            acc = [f"{r[k]:.3f}" if r[k] == r[k] else "-" for k in ("train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc")]
            step = reached.get(r["model"])
            table.add_row(str(r["model"]), *(f"{r[a]:g}" for a in varying), *acc,
                          f"{step:,}" if step is not None else "-", r["phase"])
        # as wide as its cells need, past the terminal if it must: squeezed into 100 columns (a log file, or a grid
        # of three axes) rich would cut the numbers to "0.1…" and the phases to "forgetti…"
        console.width = max(console.width, console.measure(table, options=console.options.update_width(10_000)).maximum)
    else:
        counts = Counter(r["phase"] for r in run.rows)
        table = Table(title=f"{len(run.rows):,} models by phase")
        for c in ("phase", "models", "reached 90% test", "at step (median)"):
            table.add_column(c, justify="left" if c == "phase" else "right")
        for name in (*PHASES, "diverged"):
            if counts.get(name):
                steps = [reached[r["model"]] for r in run.rows if r["phase"] == name and r["model"] in reached]
                table.add_row(name, f"{counts[name]:,}", f"{len(steps):,}",
                              f"{median(steps):,.0f}" if steps else "-")
    console.print(table)
    console.print(f"{run.model_steps:,} {plural('model-step', run.model_steps)} in {run.seconds:.1f} s "
                  f"({_rate(run.model_steps / max(run.seconds, 1e-9))} model-steps/s). Results: {run.out}",
                  soft_wrap=True)
    console.print(f"Next: fastgrok phase {run.out}; fastgrok plot {run.out} --models all; fastgrok ipr {run.out}",
                  soft_wrap=True, highlight=False)


@app.command()
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


@app.command()
def bench(
    width: Annotated[str, typer.Option(help="Widths N, comma list")] = "128,500",
    models: Annotated[str, typer.Option(help="Population sizes B, comma list; 'max' = what fits in memory")] = "1,16",
    variants: Annotated[Optional[str], typer.Option(help="Comma list from torch, torch-tf32, torch-compile, triton-fp32, triton-tf32, triton-tf32x3, triton-bf16 \\[default: torch on a CPU, all on a GPU]")] = None,
    p: Annotated[int, typer.Option("--p", help="Modulus")] = 97,
    alpha: Annotated[float, typer.Option(help="Training fraction")] = 0.5,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:K")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here (rewritten after every result)")] = None,
) -> None:
    """Model-steps/s of the reference.py loop and the population backends, side by side, checked first."""
    import json

    from fastgrok import bench as benchmark
    from fastgrok.config import parse_axis, plural
    from fastgrok.data import check_task
    from fastgrok.errors import ConfigError
    from fastgrok.results import write_atomic
    from fastgrok.train import resolve_device

    try:
        dev = resolve_device(device)
        check_task("add", p)
        widths = parse_axis("width", width)
        sizes = [b.strip() for b in models.split(",")]
        if min(widths) < 1 or any(b != "max" and not (b.isdigit() and int(b) >= 1) for b in sizes):
            raise ConfigError(f"--width and --models take positive whole numbers (or 'max'), got {width!r}, {models!r}")
        if not 0 < alpha < 1:
            raise ConfigError(f"--alpha must be in (0, 1), got {alpha}")
        chosen = tuple(v.strip() for v in variants.split(",")) if variants else None
        if out is not None:
            if out.is_dir():
                raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'bench.json'}")
            out.parent.mkdir(parents=True, exist_ok=True)

        def save(report: dict) -> None:  # after every result, so that a run cut short keeps what it measured
            if out is not None:
                write_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))

        report = benchmark.run(widths, sizes, p=p, alpha=alpha, device=str(dev), variants=chosen, save=save)
    except ConfigError as e:
        fail(str(e))
    except OSError as e:
        fail_os(e)
    except benchmark.Interrupted as e:
        done = len(e.report["results"])
        kept = f", written to {out} and {_bench_figure(e.report, out)} (marked \"interrupted\")" if out else ""
        typer.echo(f"Interrupted after {done} {plural('result', done)}{kept}.", err=True)
        raise typer.Exit(130) from None
    if out is not None:
        typer.echo(f"wrote {out} and {_bench_figure(report, out)}")


def _bench_figure(report: dict, out: Path) -> Path:
    """The report's model-steps/s against population size, beside its JSON (bench.json -> bench.png)."""
    from fastgrok.plots import bench_throughput

    return bench_throughput(report, out.with_suffix(".png"))


RunArg = Annotated[Path, typer.Argument(help="A run directory written by `fastgrok train` or `fastgrok analytic`")]
ModelsOpt = Annotated[Optional[str], typer.Option(help="Model ids (0,4,9), a phase name, or all")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:K")]


def _analysis(fn, *args, progress: str | None = None, **kwargs):
    """Run an analysis function; bad input becomes a one-line error. With `progress` (what the units are), fn
    reports progress(done, total) and a bar shows it while it runs."""
    from fastgrok.errors import ConfigError
    from fastgrok.train import resolve_device

    try:
        if "device" in kwargs:
            kwargs["device"] = str(resolve_device(kwargs["device"]))
        if progress is None:
            return fn(*args, **kwargs)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)  # a bar only on a terminal: a log file would get its last frame or a blank line
        with Progress(BarColumn(bar_width=15), MofNCompleteColumn(), TextColumn(progress), TextColumn("eta"),
                      TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task(progress, total=None)
            return fn(*args, progress=lambda done, total: bar.update(task, completed=done, total=total), **kwargs)
    except ConfigError as e:
        fail(str(e))
    except OSError as e:
        fail_os(e)


def _note_unfinished(run: Path) -> None:
    """After an analysis of a run that is not complete, say so (stderr): its results are not the final ones."""
    from fastgrok import analysis

    note = _analysis(analysis.unfinished, run)
    if note:
        typer.echo(f"note: {note}", err=True)


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("phase", "model") else "right", no_wrap=True)
    for row in rows:  # an empty subset's metric (memorised at xi 0) is NaN: shown as "-", as train's table does
        table.add_row(*((f"{v:.3f}" if v == v else "-") if isinstance(v, float) else str(v) for v in row))
    Console(width=max(100, Console().width)).print(table)


@app.command()
def ipr(
    run: RunArg,
    models: ModelsOpt = None,
    fft: Annotated[str, typer.Option(help="rfft (the paper's |rfft|, keeps DC) or full")] = "rfft",
    threshold: Annotated[float, typer.Option(help="IPR above which a neuron counts as high-IPR (periodic)")] = 0.5,
    device: DeviceOpt = "auto",
) -> None:
    """Per-neuron IPR of U, V, W and their mean: ipr.parquet, ipr-hist.png, ipr-spectra.png, IPR columns in models.csv."""
    from fastgrok import analysis

    summary = _analysis(analysis.ipr, run, fft=fft, threshold=threshold, models=models, device=device, progress="models")
    _table(f"neuron IPR by phase (|{fft}|, high = IPR > {threshold:g})", ["phase", "models", "mean IPR", "high-IPR fraction"],
           [[p, s["models"], s["mean_ipr"], s["high_ipr_fraction"]] for p, s in summary.items()])
    spectra = run / "ipr-spectra.png"  # not drawn when no model shown has a live neuron
    typer.echo(f"wrote {run / 'ipr.parquet'}, {run / 'ipr-hist.png'}" + (f", {spectra}" if spectra.is_file() else "")
               + "; models.csv has mean_ipr, high_ipr_fraction, dead_neurons")
    _note_unfinished(run)


@app.command()
def prune(
    run: RunArg,
    models: ModelsOpt = None,
    order: Annotated[str, typer.Option(help="low (lowest IPR first), high, or random")] = "low",
    every: Annotated[Optional[int], typer.Option(help="Measure after every k-th pruned neuron \\[default: 1]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random order")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Cumulative pruning by IPR without retraining; every metric after each step: prune-ORDER.parquet and .png."""
    from fastgrok import analysis

    if every is not None and every < 1:
        fail("--every must be at least 1")
    curves = _analysis(analysis.prune, run, order=order, models=models, every=every, seed=seed, device=device,
                       progress="model-levels")
    rows = []
    for m, c in list(curves.items())[:40]:
        half = int(len(c["fraction"]) // 2)
        rows.append([m, c["test_acc"][0], c["corrupted_acc"][0], c["test_acc"][half], c["corrupted_acc"][half],
                     float(c["fraction"][half])])
    _table(f"pruning {analysis.ORDERS[order]} ({len(curves)} models)", ["model", "test before", "memorised before",
           "test at half", "memorised at half", "fraction"], rows)
    typer.echo(f"wrote {run / f'prune-{order}.parquet'}, {run / f'prune-{order}.png'}")
    _note_unfinished(run)


@app.command()
def phase(
    run: RunArg,
    x: Annotated[Optional[str], typer.Option("--x", help="Grid axis on the horizontal \\[default: the first the grid varies of xi, alpha, width, wd, dropout, lr]")] = None,
    y: Annotated[Optional[str], typer.Option("--y", help="Grid axis on the vertical \\[default: the next one]")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Draw this models.csv column (mean over seeds) instead of the phase: train_acc, test_acc, clean_acc, corrupted_acc (memorised), inverted_acc, train_loss, test_loss, train90_step, test90_step (first logged step at 90%; models that never got there left out), or after `fastgrok ipr` mean_ipr, high_ipr_fraction, dead_neurons")] = None,
) -> None:
    """Phase-diagram heatmaps over two grid axes (a panel per value of the others; seeds by majority), or of one metric."""
    from collections import Counter

    from fastgrok import analysis
    from fastgrok.config import plural
    from fastgrok.results import read_config

    grid = _analysis(read_config, run)["grid"]
    x, y = analysis.phase_axes(grid, x, y)
    if metric is not None:
        table = _analysis(analysis.metric_diagram, run, metric, x=x, y=y)
        values = [r[metric] for r in table if r[metric] == r[metric]]
        span = f"{min(values):.3g} to {max(values):.3g}" if values else "no values"
        left_out = "diverged models" + (" and those never at 90%" if metric.endswith("90_step") else "")
        typer.echo(f"{len(table)} {plural('cell', len(table))} of {y} x {x}: {metric} (mean over seeds, {left_out} left out) {span}")
        typer.echo(f"wrote {run / f'{metric}-{y}-vs-{x}.png'} and .csv")
        _note_flat_axes(grid, x, y)
        _note_unfinished(run)
        return
    table = _analysis(analysis.phase_diagram, run, x=x, y=y)
    counts = Counter(r["phase"] for r in table)
    split = sum(r["agreement"] < 1 for r in table)
    _table(f"{len(table)} {plural('cell', len(table))} of {y} x {x}" + (f" ({split} with seeds disagreeing)" if split else ""),
           ["phase", "cells"], [[p, n] for p, n in counts.most_common()])
    typer.echo(f"wrote {run / f'phase-{y}-vs-{x}.png'} and .csv")
    _note_flat_axes(grid, x, y)
    _note_unfinished(run)


def _note_flat_axes(grid: dict, x: str, y: str) -> None:
    """Say which axis of a diagram the run did not vary (stderr): its diagram is one column or one row."""
    for axis, line in ((x, "column"), (y, "row")):
        if len(grid[axis]) == 1:
            typer.echo(f"note: {axis} takes one value in this run ({grid[axis][0]:g}): the diagram is one {line}",
                       err=True)


@app.command()
def plot(run: RunArg, models: Annotated[Optional[str], typer.Option(help="Model ids (0,4,9): a figure per model; a phase name, or all for each phase: the mean over its models with a band from the 10th to the 90th percentile \\[default: the first model of each phase]")] = None) -> None:
    """Training curves: accuracies (train, test, clean, memorised, inverted), losses and mean IPR against step."""
    from fastgrok import analysis

    paths = _analysis(analysis.curves, run, models=models)
    for path in paths:
        typer.echo(f"wrote {path}")
    _note_unfinished(run)


@app.command()
def analytic(
    p: Annotated[int, typer.Option("--p", help="Modulus")] = 97,
    width: Annotated[str, typer.Option(help="Width, or a grid of widths like 10:400:40")] = "500",
    op: Annotated[str, typer.Option(help="Only add has a known analytic solution")] = "add",
    seed: Annotated[int, typer.Option(help="Seed of the random frequencies and phases")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Run directory to save it in \\[default: runs/<timestamp>]")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """The analytic solution (Gromov 2023) at each width: its accuracy, saved as a run for ipr and prune."""
    from fastgrok.analytic import analytic_grid, analytic_run
    from fastgrok.plots import accuracy_vs_width
    from fastgrok.results import default_out_dir

    if op != "add":
        fail(f"the analytic solution is known for add only, got --op {op}")
    if out is None:
        _analysis(analytic_grid, p, width, seed, device=device)  # bad input is refused before a run directory is made
        out = _analysis(default_out_dir)
    rows = _analysis(analytic_run, out, p=p, widths=width, seed=seed, device=device)
    _table(f"analytic solution, p {p}", ["width", "accuracy (all pairs)", "phase"],
           [[r["width"], r["all_acc"], r["phase"]] for r in rows])
    if len(rows) > 1:
        accuracy_vs_width([r["width"] for r in rows], [r["all_acc"] for r in rows], out / "accuracy-vs-width.png",
                          f"analytic solution, p {p}")
    typer.echo(f"wrote {out}")
