"""Train a grid: split it into populations, step each one, log metrics, write the run directory; continue an
interrupted run (`resume`) to the results an uninterrupted one gives."""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastgrok import distributed, planner, process
from fastgrok.backends import make_backend
from fastgrok.config import Grid, Settings
from fastgrok.data import check_grid, pair_count
from fastgrok.device import resolve_device
from fastgrok.distributed import world
from fastgrok.errors import ConfigError
from fastgrok.families import family_of
from fastgrok.ipr import model_ipr
from fastgrok.phases import THRESHOLD, TOL, phase
from fastgrok.population import METRICS, Population
from fastgrok.results import (HISTORY_COLUMNS, MODEL_COLUMNS, ModelRow, RunError, RunWriter, check_not_busy,
                              check_out_dir, default_out_dir, inspect_run, read_config, read_population, settings_of)

# A population still training is saved (weights, optimizer state, history) after the first step that ends this many
# seconds after its last save, logged or not, so a killed run loses at most that much work (--resume continues).
CHECKPOINT_SECONDS = 600.0


@dataclass
class Run:
    """What train() and resume() leave: the run directory, its models.csv rows, how the run ended."""

    out: Path
    rows: list[ModelRow]
    status: str  # complete or interrupted
    seconds: float
    model_steps: int
    models: int  # the grid's models
    steps: int  # the steps each model trains
    nothing_left: bool = False  # resume() of a run that was already complete
    notes: list[str] = field(default_factory=list)  # what resume() repaired

    @property
    def finished(self) -> int:
        """Models that trained all their steps."""
        return sum(r.steps == self.steps for r in self.rows)


@dataclass(frozen=True)
class Start:
    """What a training is about to do, given to on_start once every option is known good (a progress display
    sizes itself from it)."""

    out: Path
    grid: Grid
    settings: Settings
    device: torch.device
    backend: str
    models: int  # models that train now: all of the grid's, or those a resumed run has left
    model_steps: int  # model-steps still to run
    populations: int
    resumed: bool
    notes: list[str] = field(default_factory=list)  # what the user should know (an option this backend ignores)


class Interrupted(Exception):
    """Raised after Ctrl-C (or SIGTERM) once everything trained so far is written."""

    def __init__(self, run: Run):
        super().__init__(f"interrupted; partial results in {run.out}")
        self.run = run


@dataclass
class _Job:
    """A population to train: its model ids (listed when it starts), its name, whether it continues from its
    saved state, and its cost (planner.job_cost: what a run over several processes balances)."""

    ids: Callable[[], list[int]]
    name: str | None
    saved: bool = False
    cost: int = 0

    def published(self) -> dict:
        return {"models": self.ids(), "name": self.name, "saved": self.saved, "cost": self.cost}


def train(grid: Grid, settings: Settings, out: str | Path | None = None, *, device: str = "auto", backend="auto",
          precision: str | None = None, on_start: Callable[[Start], None] | None = None,
          on_step: Callable[[int, int], None] | None = None, budget: int | None = None,
          populations: list[list[int]] | None = None, population_size: int | None = None) -> Run:
    """Train every model of `grid` into the new run directory `out` (default: a new runs/<timestamp>). Ctrl-C (or
    SIGTERM) writes what is done, then raises Interrupted; `resume(out)` continues it.

    backend: a name ("auto", "torch", "triton") or a backend object; precision: the fused kernels' dot precision.
    on_start(Start) is called before the first step; on_step(models, step) after every step of a population of
    `models` models. `populations` (model ids per population) defaults to planner.plan under the memory `budget`,
    of at most `population_size` models.

    Started by a launcher as one of several processes (distributed.world), process 0 plans the run and each process
    trains its share of the populations; a launcher's restart of the processes (torchrun --max-restarts, a
    requeued SLURM job) resumes the run its first attempt began (distributed.restarted_run)."""
    settings.check()
    w = world()
    out = Path(out) if out is not None else None
    if populations is not None and w.shared:
        raise ConfigError("populations given by hand train on one process")
    if populations is None and (again := distributed.restarted_run(w, out)) is not None:
        return resume(again, device=device, backend=backend, precision=precision, on_start=on_start,
                      on_step=on_step, budget=budget)
    try:
        dev = _device(device, w)
        check_grid(grid, settings)
        family_of(settings).check_widths(settings, grid.axes["width"])
        engine = _engine(backend, dev, precision, settings)
        if w.rank > 0:
            return _follow(w, dev, engine, on_step, grid=grid, settings=settings)
        if populations is None:
            planned = planner.plan(grid, settings, dev, engine, budget, population_size)
            jobs = [_Job(p.ids, f"pop{k:03d}", cost=p.cost(settings) if w.shared else 0) for k, p in enumerate(planned)]
        else:
            jobs = [_Job(lambda ids=ids: ids, None) for ids in populations]
        planner.check_room(grid, settings, out)
        if out is None:
            out = default_out_dir()  # once every option is known good: a refused run leaves no directory behind
        extra = {"populations": [len(p) for p in planned] if populations is None else [len(p) for p in populations]}
        if w.shared:
            extra["processes"] = w.size
        if population_size is not None:
            extra["population_size"] = population_size  # the plan's, which a resume makes again
        if (name := distributed.launcher_id()) is not None:
            extra["launcher"] = name  # so that a restart of the launch finds the run
        writer = RunWriter(out, grid, settings, dev, engine.name, engine.precision, extra=extra)
    except (ConfigError, OSError) as e:
        if w.shared and w.rank == 0:
            distributed.fail_everywhere(w, str(e))
        raise
    return _lead(w, writer, jobs, engine, grid, settings, dev, on_start, on_step, resumed=False,
                 notes=_notes(engine, precision), rows=[])


def resume(out: str | Path, *, device: str = "auto", backend="auto", precision: str | None = None,
           on_start: Callable[[Start], None] | None = None, on_step: Callable[[int, int], None] | None = None,
           budget: int | None = None) -> Run:
    """Continue the interrupted run in `out`: finished populations stay, a population saved with its state (at the
    interrupt, or by a checkpoint every CHECKPOINT_SECONDS) continues from it, and the rest trains again from its
    seeds, also a population whose files are missing or damaged (results.inspect_run); the results are those of an
    uninterrupted run, on any number of processes. It keeps the run's precision unless one is given. A run with
    every model trained is marked complete (a kill may have come after its last save) and trains nothing."""
    out, w = Path(out), world()
    if w.rank > 0:
        dev = _device(device, w)
        return _follow(w, dev, None, on_step, backend=backend, precision=precision)
    try:
        read_config(out)
        check_not_busy(out)
        found = inspect_run(out)
        config = found.config
        grid, settings = Grid(config["grid"]), settings_of(config)
        done = {m for e in found.finished for m in e["models"]}
        if len(done) == len(grid):
            notes = [f"config.json said {config['status']!r} (stopped after its last save): marked complete"
                     ] * (config["status"] != "complete") + [f"removed {len(found.orphans)} leftover file(s)"] * bool(found.orphans)
            if notes:
                RunWriter.reopen(found, out).finish("complete", models_written=len(done))
            if w.shared:
                distributed.publish(w, out, [], precision=config.get("precision"))
                distributed.Inbox(w).wait_all(lambda: None, WAIT_FOR_OTHERS["interrupted"])
            return Run(out, sorted(found.rows.values(), key=lambda r: r.model), "complete", 0.0, 0, len(grid),
                       settings.steps, nothing_left=True, notes=notes)
        given = precision
        precision = config.get("precision") if precision is None else precision
        dev = _device(device, w)
        engine = _engine(backend, dev, precision, settings)
        writer = RunWriter.reopen(found, out)
    except (ConfigError, OSError) as e:
        if w.shared:
            distributed.fail_everywhere(w, str(e))
        raise
    # the populations saved part-trained, then those of a fresh plan less the models trained or continuing
    def cost(ids: list[int], steps: int) -> int:  # what several processes balance
        return planner.job_cost(grid, settings, ids, steps) if w.shared else 0

    jobs = [_Job(lambda p=p: p["models"], p["name"], True, cost(p["models"], settings.steps - p["steps"]))
            for p in found.partial]
    skip = done | {m for p in found.partial for m in p["models"]}
    for p in planner.plan(grid, settings, dev, engine, budget, config.get("population_size")):
        if ids := [i for i in p.ids() if i not in skip]:
            jobs.append(_Job(lambda ids=ids: ids, writer.new_name(), cost=cost(ids, settings.steps)))
    notes = _notes(engine, given) + [f"{why}: population {name} trains again" for name, why in found.problems.items()]
    kept = [found.rows[m] for m in sorted(done)]
    already = sum(len(e["models"]) * e["steps"] for e in found.partial)
    return _lead(w, writer, jobs, engine, grid, settings, dev, on_start, on_step, resumed=True, notes=notes,
                 rows=kept, already=already)


def _device(device: str, w) -> torch.device:
    dev = resolve_device(device)
    if w.shared and dev.type == "cuda" and dev.index is None:
        # a launcher starts one process a GPU: the local rank's among those visible, or the only one visible (SLURM's
        # --gpus-per-task 1 gives each task its own CUDA_VISIBLE_DEVICES)
        dev = torch.device("cuda", w.local_rank % torch.cuda.device_count())
    return dev


def _lead(w, writer, jobs: list[_Job], engine, grid: Grid, settings: Settings, dev: torch.device, on_start, on_step,
          *, resumed: bool, notes: list[str], rows: list[ModelRow], already: int = 0) -> Run:
    """Process 0 (or the only one): publish the jobs to the others, train its share, record theirs."""
    left = len(grid) - len(rows)  # the models that train now, on every process: process 0's progress counts them all
    if w.shared:
        notes = notes + planner.share_notes([j.cost for j in jobs], w.size, left)
    start = Start(writer.out, grid, settings, dev, engine.name, left, left * settings.steps - already, len(jobs),
                  resumed=resumed, notes=notes)
    training = _Training(writer, engine, grid, settings, dev, on_step)
    if w.shared:
        published = [j.published() for j in jobs]
        distributed.publish(w, writer.out, published, grid=grid.axes, settings=asdict(settings), device=dev.type,
                            precision=engine.precision)
        jobs = [j for j, rank in zip(jobs, planner.balance([j.cost for j in jobs], w.size)) if rank == 0]
        planner.check_fits([j.ids() for j in jobs], grid, settings, engine, dev, "process 0")
        training.inbox = distributed.Inbox(w)
        training.process_log = distributed.ProcessLog(w, writer.out, f"{dev} ({engine.name}), {len(jobs)} of "
                                                      f"{len(published)} populations")
    return training.run([(j.ids, j.name, j.saved) for j in jobs], rows, start, on_start)


def _follow(w, dev: torch.device, engine, on_step, *, grid: Grid | None = None, settings: Settings | None = None,
            backend="auto", precision: str | None = None) -> Run:
    """A process other than 0: take its share of what process 0 published and train it. Training a fresh run, its
    command (grid, settings) must be process 0's; resuming, they are the run's."""
    theirs = distributed.setup(w)
    out = Path(theirs["out"])
    if not theirs["jobs"]:
        distributed.RankWriter(w, out).finish("complete")
        config = read_config(out)
        return Run(out, [], "complete", 0.0, 0, len(Grid(config["grid"])), config["settings"]["steps"], nothing_left=True)
    if grid is not None:
        distributed.check_agrees(w, theirs, {"grid": grid.axes, "settings": asdict(settings), "device": dev.type})
    else:
        config = read_config(out)
        grid, settings = Grid(config["grid"]), settings_of(config)
        distributed.check_agrees(w, theirs, {"device": dev.type})
        engine = _engine(backend, dev, precision if precision is not None else theirs["precision"], settings)
    owner = planner.balance([j["cost"] for j in theirs["jobs"]], w.size)
    jobs = [j for j, rank in zip(theirs["jobs"], owner) if rank == w.rank]
    planner.check_fits([j["models"] for j in jobs], grid, settings, engine, dev, f"process {w.rank}")
    writer = distributed.RankWriter(w, out)
    models = sum(len(j["models"]) for j in jobs)
    start = Start(out, grid, settings, dev, engine.name, models, models * settings.steps, len(jobs), resumed=False)
    training = _Training(writer, engine, grid, settings, dev, on_step)
    training.counter = distributed.StepCounter(w)
    training.process_log = distributed.ProcessLog(w, out, f"{dev} ({engine.name}), {len(jobs)} of "
                                                  f"{len(theirs['jobs'])} populations")
    return training.run([(lambda j=j: j["models"], j["name"], j["saved"]) for j in jobs], [], start, None)


def _engine(backend, device: torch.device, precision: str | None, settings: Settings):
    """The backend object for a name (make_backend) or the one given, checked against the settings."""
    engine = make_backend(backend, device, precision, settings) if isinstance(backend, str) else backend
    engine.check(settings)
    if device.type == "cpu":
        process.tune_cpu()
    return engine


def _notes(engine, precision: str | None) -> list[str]:
    """A --precision the chosen backend does not use is said, not silently dropped."""
    if precision is not None and engine.precision is None:
        return [f"--precision {precision} picks the Triton kernels' dot precision; the {engine.name} backend "
                "running here computes in fp32."]
    return []


@dataclass(frozen=True)
class PlannedPopulation:
    width: int
    models: int
    sizes: tuple[int, int]  # smallest and largest training set
    memory: int  # bytes the planner reserves
    seconds: float  # estimated from measured steps (estimate_seconds)
    rank: int = 0  # the process that trains it (planner.shares)


@dataclass(frozen=True)
class Plan:
    """What `fastgrok train --dry-run` shows: the populations a run would train, one after another."""

    grid: Grid
    settings: Settings
    device: torch.device
    backend: str
    populations: list[PlannedPopulation]
    budget: int
    budget_share: str
    disk: int  # bytes the run would write (planner.run_bytes)
    probe: str  # how the time was estimated
    notes: list[str]
    processes: int = 1  # the processes the populations are shared by

    @property
    def seconds(self) -> float:
        """The run's time: its slowest process's."""
        return max(self.rank_seconds)

    @property
    def rank_seconds(self) -> list[float]:
        return [sum(p.seconds for p in self.populations if p.rank == r) for r in range(self.processes)]


def plan(grid: Grid, settings: Settings, out: str | Path | None = None, *, device: str = "auto", backend="auto",
         precision: str | None = None, budget: int | None = None, estimate: bool = True, processes: int = 1,
         population_size: int | None = None) -> Plan:
    """The populations `train` would make of the grid, their memory and, with `estimate`, the time each would
    take on this device, from a few steps measured on a sample of each width's models; with `processes`, the one
    of that many processes (each on a device like this one) that trains each (planner.shares). Nothing is
    written; `out`, if given, is checked as train would. The work grows with the populations and widths, not with
    the models."""
    settings.check()
    if out is not None:
        check_out_dir(Path(out))
    dev = resolve_device(device)
    check_grid(grid, settings)
    family_of(settings).check_widths(settings, grid.axes["width"])
    engine = _engine(backend, dev, precision, settings)
    planner.check_room(grid, settings, Path(out) if out is not None else None)
    budget = planner.memory_budget(dev) if budget is None else budget
    dropout = any(v > 0 for v in grid.axes["dropout"])
    planned = planner.plan(grid, settings, dev, engine, budget, population_size)
    ranks = planner.shares(planned, settings, processes)
    cost = {}  # width -> (seconds per example-step, seconds per model evaluated): the same for every task
    if estimate:
        for width in grid.axes["width"]:
            mine = [p for p in planned if p.width == width and p.ops == planned[0].ops]
            sample = [grid.model(i) for p in mine for i in p.sample(max(1, PROBE_MODELS[dev.type] // len(mine)))]
            cost[width] = estimate_costs(sample[: PROBE_MODELS[dev.type]], settings, dev, engine)
    logs = len({*range(0, settings.steps + 1, settings.log_every), settings.steps})
    populations = []
    for p, rank in zip(planned, ranks):
        task = settings.with_op(p.ops[0])
        pairs = pair_count(task.op, task.p, task.terms)
        memory = planner.population_bytes(task, p.width, p.sizes[1], pairs, len(p), engine, dropout, dev)
        seconds = math.nan
        if estimate:
            per_example, per_model = cost[p.width]
            seconds = settings.steps * per_example * p.examples(settings.batch_size) + logs * per_model * len(p)
        populations.append(PlannedPopulation(p.width, len(p), p.sizes, memory, seconds, rank))
    probe = f"{PROBE_STEPS} steps and an evaluation of up to {PROBE_MODELS[dev.type]} models of each width"
    return Plan(grid, settings, dev, engine.name, populations, budget, planner.BUDGETS[dev.type][1],
                planner.run_bytes(grid, settings), probe,
                _notes(engine, precision) + planner.share_notes([p.cost(settings) for p in planned], processes, len(grid)),
                processes)


PROBE_MODELS = {"cpu": 8, "cuda": 256}  # models whose steps estimate a width's time
PROBE_STEPS = 3


def estimate_costs(hypers: list, settings: Settings, device: torch.device, engine) -> tuple[float, float]:
    """(seconds per example of a model's step, seconds per model of an evaluation) on `device`, from the time of
    PROBE_STEPS steps and one evaluation of a population of these models, after a step to warm up. A GPU's time
    per model falls with the population's size, so for populations larger than the sample the estimate is an
    upper one there."""
    pop = Population(hypers, settings, device)
    engine.step(pop)
    _sync(device)
    begin = time.perf_counter()
    for _ in range(PROBE_STEPS):
        engine.step(pop)
    _sync(device)
    per_step = (time.perf_counter() - begin) / PROBE_STEPS
    begin = time.perf_counter()
    pop.evaluate(engine)
    _sync(device)
    per_log = time.perf_counter() - begin
    return per_step / float(pop.batch_counts.sum()), per_log / len(pop)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _History:
    """The metrics of a population at every logged step, as the history table's columns."""

    def __init__(self, engine, saved=None, keep=lambda step: True):
        """saved: the history table of an unfinished population being continued; rows whose step `keep`
        refuses (an off-schedule log at the moment it was interrupted) are dropped."""
        self.engine = engine
        self.columns = {c: [] for c in HISTORY_COLUMNS}
        self.last = None
        if saved is not None:
            rows = np.array([keep(int(step)) for step in saved["step"].to_numpy()], dtype=bool)
            for c in HISTORY_COLUMNS:
                self.columns[c].append(saved[c].to_numpy()[rows])

    def log(self, pop: Population) -> dict[str, torch.Tensor]:
        metrics = pop.evaluate(self.engine)
        self.columns["model"].append(np.asarray(pop.model_ids, dtype=np.int32))
        self.columns["step"].append(np.full(len(pop), pop.step, dtype=np.int32))
        for k in METRICS:
            self.columns[k].append(metrics[k].numpy())
        self.columns["ipr"].append(model_ipr(pop.family, pop.tensors, pop.settings).cpu().numpy())
        self.last = (pop.step, metrics)
        return metrics

    def table(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.columns.items()}


def first_reached(history: dict, metric: str, level: float = THRESHOLD) -> dict[int, int]:
    """{model: the first logged step at which `metric` was >= level (the phases' 90%)} for the models of a
    history table that reached it."""
    models, steps = np.asarray(history["model"]), np.asarray(history["step"])
    hit = np.asarray(history[metric]) >= level - TOL
    first: dict[int, int] = {}
    for m, step in zip(models[hit].tolist(), steps[hit].tolist()):
        first[m] = min(first.get(m, step), step)
    return first


def model_rows(pop: Population, metrics: dict[str, torch.Tensor], history: dict) -> list[ModelRow]:
    """models.csv rows of a population: grid point, final metrics, phase, and from its history (the table of
    every logged step) when train and test accuracy first reached 90%."""
    train90, test90 = (first_reached(history, f"{k}_acc") for k in ("train", "test"))
    rows = []
    for b, h in enumerate(pop.hypers):
        values = {k: float(metrics[k][b]) for k in METRICS}
        diverged = bool(pop.diverged[b])
        model = pop.model_ids[b]
        rows.append(ModelRow(model, h, {k: None if math.isnan(v) else v for k, v in values.items()},
                             phase(values["train_acc"], values["test_acc"], h.xi, diverged), diverged, pop.step,
                             train90.get(model), test90.get(model)))
    return rows


class _Training:
    """The loop over a run's populations (run) and the training of one (population), writing as it goes."""

    def __init__(self, writer: RunWriter, engine, grid: Grid, settings: Settings, device: torch.device,
                 on_step: Callable[[int, int], None] | None):
        self.writer, self.engine, self.grid, self.settings, self.device = writer, engine, grid, settings, device
        # one of several processes: process 0 reads the others' posts and steps (inbox), the others count theirs
        self.inbox: distributed.Inbox | None = None
        self.counter: distributed.StepCounter | None = None
        self.process_log: distributed.ProcessLog | None = None  # its own populations, one of several processes
        self.received, self.others, self.step = 0.0, {}, 0  # others: model id -> its row, from another process
        self.others_steps = 0
        self.grid = grid
        self.on_step = on_step
        self.model_steps = 0
        # where the seconds go (config.json "time_split"): building populations, training steps, logging (evaluation
        # and IPR), writing results; the device is synchronised at each boundary so GPU work lands where it belongs
        self.split = dict.fromkeys(("setup", "steps", "logging", "saving"), 0.0)
        self.clock = time.perf_counter()

    def run(self, jobs: list[tuple[Callable[[], list[int]], str | None, bool]], rows: list[ModelRow], start: Start,
            on_start: Callable[[Start], None] | None) -> Run:
        """Train each job (its model ids when asked, built then; its name, or None for the next free one; whether
        it continues from its saved state), then mark the run finished.
        Ctrl-C or SIGTERM: the population in flight is saved at the step it reached, then Interrupted."""
        began = time.perf_counter()
        try:
            if on_start is not None:
                on_start(start)
            with _stop_requests() as stop:
                for ids, name, saved in jobs:
                    if stop.asked:
                        raise KeyboardInterrupt
                    new_rows, interrupted = self.population(ids(), name, saved, stop)
                    rows += new_rows
                    if interrupted:
                        raise KeyboardInterrupt
                return self.finish("complete", rows, began, stop)
        except KeyboardInterrupt:
            raise Interrupted(self.finish("interrupted", rows, began)) from None
        except OSError as e:  # a file of the run could not be written (a full disk): say what is kept
            raise RunError(self.write_failed(e, rows, began)) from None
        finally:
            self.writer.close()  # also when an error ends the run, so a --resume in this process may write it

    def population(self, ids: list[int], name: str | None, saved: bool, stop) -> tuple[list[ModelRow], bool]:
        """Train one population to the end (or to a stop request) and save it: its rows, and whether it stopped."""
        steps = self.settings.steps
        self.lap("steps")
        pop = Population([self.grid.model(i) for i in ids], self.settings, self.device, model_ids=ids)
        if not saved:
            name = name or self.writer.new_name()
            history = _History(self.engine)
            self.lap("setup")
            self.log(history, pop)
        else:
            state, saved = read_population(self.writer.out, name)
            pop.load_state(state)
            history = _History(self.engine, saved, keep=lambda step: self.on_schedule(step) and step <= pop.step)
            self.lap("setup")
        if self.process_log is not None:
            self.process_log.began_population(name, len(pop), pop.hypers[0].width, pop.step)
        saved_at, interrupted = time.perf_counter(), False
        self.began = (saved_at, pop.step)
        try:
            while pop.step < steps:
                self.engine.step(pop)
                self.model_steps += len(pop)
                self.step = pop.step
                if self.counter is not None:
                    self.counter.add(len(pop))
                if self.on_schedule(pop.step):
                    self.log(history, pop)
                if pop.step < steps and time.perf_counter() - saved_at >= CHECKPOINT_SECONDS:
                    self.save(pop, name, history, self.metrics(history, pop))
                    saved_at = time.perf_counter()
                if self.on_step is not None:
                    self.on_step(len(pop), pop.step)
                if self.inbox is not None and time.perf_counter() - self.received >= 1.0:
                    self.receive()
                if stop.asked:
                    interrupted = True
                    break
        except _StopNow:
            raise  # mid-step: this population is not saved, it continues from its last save
        except KeyboardInterrupt:  # raised by code between steps (on_step)
            interrupted = True
        if history.last is None or history.last[0] != pop.step:
            self.log(history, pop)
        return self.save(pop, name, history, history.last[1]), interrupted

    def on_schedule(self, step: int) -> bool:
        return step % self.settings.log_every == 0 or step == self.settings.steps

    def lap(self, part: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.split[part] += now - self.clock
        self.clock = now

    def log(self, history: _History, pop: Population) -> dict[str, torch.Tensor]:
        self.lap("steps")
        metrics = history.log(pop)
        self.lap("logging")
        return metrics

    def metrics(self, history: _History, pop: Population) -> dict[str, torch.Tensor]:
        """The metrics at pop's step: logged there, or evaluated now without a history row (a checkpoint between
        logged steps; the history keeps the schedule an uninterrupted run logs)."""
        if history.last is not None and history.last[0] == pop.step:
            return history.last[1]
        self.lap("steps")
        metrics = pop.evaluate(self.engine)
        self.lap("logging")
        return metrics

    def save(self, pop: Population, name: str, history: _History, metrics) -> list[ModelRow]:
        self.lap("steps")
        table = history.table()
        rows = model_rows(pop, metrics, table)
        self.writer.add_population(rows, table, pop.weights(),
                                   state=pop.state() if pop.step < self.settings.steps else None, name=name)
        self.lap("saving")
        if self.process_log is not None:
            began, step = self.began
            self.process_log.saved(name, pop.step, self.settings.steps, (pop.step - step) * len(pop),
                                   time.perf_counter() - began)
        return rows

    def write_failed(self, error: OSError, rows: list[ModelRow], began: float) -> str:
        """The one line that says what failed and what the run keeps, once config.json says 'interrupted' (if
        it can still be written)."""
        where = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        try:
            self.finish("interrupted", rows, began)
            marked = "config.json says 'interrupted'"
        except OSError:
            marked = "config.json could not be updated and still says 'running'"
        written, steps = self.writer.config["written"], self.settings.steps
        finished = sum(len(w["models"]) for w in written if w["steps"] == steps)
        partial = sum(len(w["models"]) for w in written if w["steps"] < steps)
        then = "free some space" if error.errno == errno.ENOSPC else "fix that"
        return (f"{where}. Kept: {finished} of {len(self.grid)} models trained and {partial} saved part-trained; "
                f"{marked}. {then[0].upper()}{then[1:]}, then `fastgrok train --resume {self.writer.out}` "
                "continues from what was saved")

    def receive(self) -> None:
        """Process 0: count the others' model-steps and record the populations they wrote since the last look."""
        others = self.inbox.steps()
        self.others_steps += others
        if others and self.on_step is not None:
            self.on_step(others, self.step)
        for m in self.inbox.new():
            if m["kind"] == "population":  # a later save of a population replaces its rows
                self.writer.record(m["name"], m["cells"], m["steps"], m["state"])
                self.others |= {int(c[0]): ModelRow.from_cells(dict(zip(MODEL_COLUMNS, c)), self.grid.model(int(c[0])))
                                for c in m["cells"]}
        self.received = time.perf_counter()

    def finish(self, status: str, rows: list[ModelRow], began: float, stop=None) -> Run:
        if self.counter is not None:
            self.counter.add(0, now=True)
        if self.inbox is not None:  # the run ends when every process has: complete only if all of them are
            self.inbox.wait_all(self.receive, WAIT_FOR_OTHERS[status], stop)
            if not self.inbox.all_complete():
                status = "interrupted"
            self.writer.config["written"].sort(key=lambda w: w["name"])
            rows = rows + list(self.others.values())
            self.model_steps += self.others_steps
        if self.process_log is not None:
            self.process_log.finished(status)
        rows.sort(key=lambda r: r.model)
        seconds = time.perf_counter() - began
        self.writer.finish(status, seconds=round(seconds, 3), model_steps=self.model_steps,
                           model_steps_per_s=round(self.model_steps / max(seconds, 1e-9), 1), models_written=len(rows),
                           time_split={k: round(v, 3) for k, v in self.split.items()})
        return Run(self.writer.out, rows, status, seconds, self.model_steps, len(self.grid), self.settings.steps)


# seconds process 0 waits for the others to finish: a whole run's worth when it finished its own share first (a stop
# request ends the wait); after a stop, about the time the others take to save their population in flight (what they
# save later is in their journal)
WAIT_FOR_OTHERS = {"complete": 7 * 24 * 3600.0, "interrupted": 10.0}


class _StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without saving the population in the middle of a step."""


@contextlib.contextmanager
def _stop_requests():
    """Ctrl-C, or a scheduler's SIGTERM (a job's time limit), while training. Python would raise between any two
    operations, in the middle of an optimizer update (U updated, V not) whose state would then be saved; instead
    the first signal asks the loop to stop after the step in flight, and a second Ctrl-C stops at once (_StopNow).
    Started by a launcher, a process counts only a Ctrl-C a second or more after the first: the launcher's stop
    reaches it several times at once (torchrun passes on the Ctrl-C its processes got from the terminal too, and
    SLURM signals every process of a job step)."""
    stop = types.SimpleNamespace(asked=False, at=0.0)
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield stop
        return
    grace = 1.0 if distributed.launcher_id() is not None else 0.0

    def ask(signum, frame):
        if stop.asked:
            if signum == signal.SIGINT and time.monotonic() - stop.at >= grace:
                raise _StopNow
            return
        stop.asked, stop.at = True, time.monotonic()
        print("\nStopping after the step in flight, then saving (Ctrl-C again: stop now, losing the population "
              "training since its last save).", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
