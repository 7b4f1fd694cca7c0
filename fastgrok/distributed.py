"""One run over several processes, started by a launcher (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the
rendezvous): each process trains its share of the plan's populations (planner.shares) and writes their files into
the one run directory; process 0 alone writes config.json and models.csv. The others tell it what they wrote
through torch.distributed's key-value store (the launcher's rendezvous store), so the run directory always reads
as a single-process run's at some point of its training, and a run interrupted on any number of processes
resumes on any other."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastgrok.errors import ConfigError
from fastgrok.results import write_population, written_entry

PREFIX = "fastgrok/"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: object | None = None  # torch.distributed.Store, for size > 1

    @property
    def shared(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place in the run: alone, or one of WORLD_SIZE started by a launcher (the process group is
    joined on first call, over gloo: only small messages pass between processes, through its store)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    store = dist.distributed_c10d._get_default_store()
    return World(dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")), store)


def announce(w: World, key: str, value: str) -> None:
    w.store.set(PREFIX + key, value)


def wait_for(w: World, key: str) -> str:
    return w.store.get(PREFIX + key).decode()


def post(w: World, message: dict) -> None:
    """Tell process 0 something (a population written, this process finished): the n-th post of the run."""
    n = w.store.add(PREFIX + "posts", 1)
    w.store.set(f"{PREFIX}post/{n}", json.dumps(message))


class StepCounter:
    """A process's model-steps, added to the run's count in the store about once a second, for process 0's
    progress bar."""

    def __init__(self, w: World):
        self.world, self.pending, self.sent = w, 0, time.monotonic()

    def add(self, n: int, now: bool = False) -> None:
        self.pending += n
        if self.pending and (now or time.monotonic() - self.sent >= 1.0):
            self.world.store.add(PREFIX + "steps", self.pending)
            self.pending, self.sent = 0, time.monotonic()


class Inbox:
    """Process 0's reading of the others' posts, in the order they were made, and of their model-steps."""

    def __init__(self, w: World):
        self.world, self.read, self.finished = w, 0, {}  # finished: rank -> its status
        self.counted = 0

    def steps(self) -> int:
        """The others' model-steps since the last call."""
        total = self.world.store.add(PREFIX + "steps", 0)
        new, self.counted = total - self.counted, total
        return new

    def new(self) -> list[dict]:
        count = self.world.store.add(PREFIX + "posts", 0)
        out = []
        while self.read < count:
            self.read += 1
            message = json.loads(self.world.store.get(f"{PREFIX}post/{self.read}"))
            if message["kind"] == "finished":
                self.finished[message["rank"]] = message["status"]
            out.append(message)
        return out

    def wait_all(self, receive, timeout: float) -> None:
        """Call `receive` (which reads the new posts and steps) until every other process has said it finished, or
        `timeout` seconds pass: a process that died says nothing, and what it wrote unannounced trains again on
        resume."""
        end = time.monotonic() + timeout
        receive()
        while len(self.finished) < self.world.size - 1 and time.monotonic() < end:
            time.sleep(0.1)
            receive()


def fail_everywhere(w: World, message: str) -> None:
    """Process 0 could not start the run: tell the others, which wait for its run directory, before raising."""
    announce(w, "out", "!" + message)
    raise ConfigError(message)


def run_directory(w: World) -> str:
    out = wait_for(w, "out")
    if out.startswith("!"):
        raise ConfigError(out[1:])
    return out


class RankWriter:
    """What a process other than 0 writes: its populations' files, each announced to process 0, which records
    them in config.json and models.csv (RunWriter.record); then that it finished, and how."""

    def __init__(self, w: World, out):
        self.world, self.out = w, Path(out)
        self.config = {"written": []}

    def add_population(self, rows, history, weights, state=None, name: str | None = None) -> str:
        write_population(self.out, name, history, weights, state)
        cells, steps = [r.cells() for r in rows], rows[0].steps if rows else 0
        entry = written_entry(name, cells, steps, state is not None)
        self.config["written"] = [e for e in self.config["written"] if e["name"] != name] + [entry]
        post(self.world, {"kind": "population", **entry, "cells": cells})
        return name

    def finish(self, status: str, **extra) -> None:
        post(self.world, {"kind": "finished", "rank": self.world.rank, "status": status})

    def close(self) -> None:
        pass


def setup_of(grid, settings, device, sizes: list[int]) -> str:
    """What every process of a run must agree on: the grid, the settings, the kind of device and the plan (the
    models of each population, which follow from each device's memory)."""
    return json.dumps({"grid": grid.axes, "settings": asdict(settings), "device": device.type, "plan": sizes},
                      sort_keys=True, default=str)


def check_setup(w: World, mine: str, out) -> None:
    """A process other than 0, before it trains: the run directory process 0 made must be visible here, and the
    command, the device kind and the plan must be process 0's."""
    if not (out / "config.json").exists():
        raise ConfigError(f"process {w.rank} cannot see the run directory {out} that process 0 made: give --out "
                          "on a filesystem every process shares")
    theirs, ours = json.loads(wait_for(w, "setup")), json.loads(mine)
    for key, what in (("grid", "its grid options"), ("settings", "its settings"), ("device", "its kind of device"),
                      ("plan", "its populations (its device's memory differs)")):
        if theirs[key] != ours[key]:
            raise ConfigError(f"process {w.rank} differs from process 0 in {what}: every process must run the same "
                              f"command on the same kind of device ({key}: {ours[key]} against {theirs[key]})")
