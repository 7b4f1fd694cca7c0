"""Train a grid: split it into populations, step each one, log metrics, write the run directory."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastgrok.backends import make_backend
from fastgrok.config import AXES, Grid, Settings
from fastgrok.errors import ConfigError
from fastgrok.ipr import neuron_ipr
from fastgrok.phases import THRESHOLD, TOL, phase
from fastgrok.population import METRICS, Population, check_training_sets, plan
from fastgrok.results import HISTORY_COLUMNS, RunWriter, read_models, read_population


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda[:index]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu or cuda[:index]")
    return dev


class Interrupted(Exception):
    """Raised after Ctrl-C (or SIGTERM) once everything trained so far is written."""

    def __init__(self, run: "Run"):
        super().__init__(f"interrupted; partial results in {run.out}")
        self.run = run


@dataclass
class Run:
    out: Path
    rows: list[dict]
    status: str
    seconds: float
    model_steps: int


# A population still training is saved (weights, optimizer state, history) at the first logged step after
# this many seconds since its last save, so a killed run loses at most that much work (--resume continues).
CHECKPOINT_SECONDS = 600.0


class _History:
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
        self.columns["ipr"].append(neuron_ipr(pop.U, pop.V, pop.W).model_mean().cpu().numpy())
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


def model_rows(pop: Population, metrics: dict[str, torch.Tensor], history: dict) -> list[dict]:
    """models.csv rows of a population: grid axes, final metrics, phase, and from its history (the table of
    every logged step) when train and test accuracy first reached 90% (blank if never)."""
    reached = {f"{k}90_step": first_reached(history, f"{k}_acc") for k in ("train", "test")}
    rows = []
    for b, h in enumerate(pop.hypers):
        row = {"model": pop.model_ids[b], **{a: getattr(h, a) for a in AXES}}
        row.update({k: float(metrics[k][b]) for k in METRICS})
        row["diverged"] = bool(pop.diverged[b])
        row["steps"] = pop.step
        row["phase"] = phase(row["train_acc"], row["test_acc"], h.xi, row["diverged"])
        row.update({column: first.get(row["model"], "") for column, first in reached.items()})
        rows.append(row)
    return rows


def train(grid: Grid, settings: Settings, out: str | Path, *, device: str = "auto", backend="auto",
          precision: str | None = None,
          on_step: Callable[[int, int], None] | None = None, budget: int | None = None,
          populations: list[list[int]] | None = None, resume: bool = False) -> Run:
    """Train every model of `grid`; write `out`. Ctrl-C (or SIGTERM) writes what is done, then raises Interrupted.

    on_step(models, step) is called after every step of a population of `models` models.

    backend: a name ("auto", "torch", "triton") or a backend object. `populations` (model indices per
    population) defaults to `population.plan` under the memory `budget`. resume=True continues an interrupted
    run in `out`: finished populations stay, a population saved with its state (at the interrupt, or by a
    checkpoint every CHECKPOINT_SECONDS) continues from it, the rest trains again from its seeds; the results
    are those of an uninterrupted run."""
    settings.check()
    out = Path(out)
    dev = resolve_device(device)
    hypers = grid.models()
    check_training_sets(hypers, settings)
    engine = make_backend(backend, dev, precision, settings) if isinstance(backend, str) else backend
    engine.check(settings)
    writer, done, unfinished = RunWriter.reopen(out, settings.steps) if resume else (None, set(), [])
    continuing = {m for w in unfinished for m in w["models"]}
    rows = [r for r in read_models(out) if r["model"] in done] if resume else []
    todo = [i for i in range(len(hypers)) if i not in done and i not in continuing]
    if populations is None and todo:
        planned = plan([hypers[i] for i in todo], settings, dev, budget, backend=engine.name)
        populations = [[todo[j] for j in ids] for ids in planned]
    populations = populations or []
    if writer is None:
        writer = RunWriter(out, grid, settings, dev, engine.name,
                           extra={"populations": [len(ids) for ids in populations]})
    jobs = [(w["models"], w["name"]) for w in unfinished] + [(ids, None) for ids in populations]
    start, model_steps = time.perf_counter(), 0
    # where the seconds go (config.json "time_split"): building populations, training steps, logging (evaluation
    # and IPR), writing results; the device is synchronised at each boundary so GPU work lands where it belongs
    split = dict.fromkeys(("setup", "steps", "logging", "saving"), 0.0)
    clock = [time.perf_counter()]

    def lap(part: str) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        split[part] += now - clock[0]
        clock[0] = now

    on_schedule = lambda step: step % settings.log_every == 0 or step == settings.steps  # noqa: E731

    def summary(status: str) -> Run:
        rows.sort(key=lambda r: r["model"])
        seconds = time.perf_counter() - start
        writer.finish(status, seconds=round(seconds, 3), model_steps=model_steps,
                      model_steps_per_s=round(model_steps / max(seconds, 1e-9), 1), models_written=len(rows),
                      time_split={k: round(v, 3) for k, v in split.items()})
        return Run(out, rows, status, seconds, model_steps)

    def save(pop, name, history, metrics) -> list[dict]:
        lap("steps")
        table = history.table()
        new_rows = model_rows(pop, metrics, table)
        writer.add_population(new_rows, table, pop.weights(),
                              state=pop.state() if pop.step < settings.steps else None, name=name)
        lap("saving")
        return new_rows

    def log(history, pop):
        lap("steps")
        metrics = history.log(pop)
        lap("logging")
        return metrics

    try:
        with _stop_requests() as stop:
            for ids, name in jobs:
                if stop.asked:
                    raise KeyboardInterrupt
                lap("steps")
                pop = Population([hypers[i] for i in ids], settings, dev, model_ids=ids)
                if name is None:
                    name = writer.new_name()
                    history = _History(engine)
                    lap("setup")
                    log(history, pop)
                else:
                    state, saved = read_population(out, name)
                    pop.load_state(state)
                    history = _History(engine, saved, keep=lambda step: on_schedule(step) and step <= pop.step)
                    lap("setup")
                saved_at, interrupted = time.perf_counter(), False
                try:
                    while pop.step < settings.steps:
                        engine.step(pop)
                        model_steps += len(pop)
                        if on_schedule(pop.step):
                            metrics = log(history, pop)
                            if pop.step < settings.steps and time.perf_counter() - saved_at >= CHECKPOINT_SECONDS:
                                save(pop, name, history, metrics)
                                saved_at = time.perf_counter()
                        if on_step is not None:
                            on_step(len(pop), pop.step)
                        if stop.asked:
                            interrupted = True
                            break
                except _StopNow:
                    raise  # mid-step: this population is not saved, it continues from its last save
                except KeyboardInterrupt:  # raised by code between steps (on_step)
                    interrupted = True
                if history.last is None or history.last[0] != pop.step:
                    log(history, pop)
                rows += save(pop, name, history, history.last[1])
                if interrupted:
                    raise KeyboardInterrupt
        return summary("complete")
    except KeyboardInterrupt:
        raise Interrupted(summary("interrupted")) from None
    finally:
        writer.close()  # also when an error ends the run, so a --resume in this process may write it


class _StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without saving the population in the middle of a step."""


@contextlib.contextmanager
def _stop_requests():
    """Ctrl-C, or a scheduler's SIGTERM (a job's time limit), while training. Python would raise between any two
    operations, in the middle of an optimizer update (U updated, V not) whose state would then be saved; instead
    the first signal asks the loop to stop after the step in flight, and a second stops at once (_StopNow)."""
    stop = types.SimpleNamespace(asked=False)
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield stop
        return

    def ask(signum, frame):
        if stop.asked:
            raise _StopNow
        stop.asked = True
        print("\nStopping after the step in flight, then saving (Ctrl-C again: stop now, losing the population "
              "training since its last save).", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
