"""One run over several processes, started by a launcher: torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK and
the rendezvous) or SLURM's srun (whose SLURM_* variables are read the same way). Process 0 plans the run and
publishes the populations; each process trains its share (planner.balance of their costs) and writes their files
into the one run directory. Process 0 alone writes config.json and models.csv: the others tell it what they wrote
through torch.distributed's key-value store, and keep the same messages in their journal in the run (logs/), so
that what they saved after process 0 stopped is still recorded when the run is resumed. The run directory thus
reads as a single-process run's at some point of its training, and a run interrupted on any number of processes
resumes on any other."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastgrok.errors import ConfigError
from fastgrok.results import JOURNALS, write_population, written_entry

@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: object | None = None  # torch.distributed.Store, for size > 1

    @property
    def shared(self) -> bool:
        return self.size > 1


def launched() -> tuple[int, int, int]:
    """(rank, size, local rank) of this process as its launcher started it: torchrun's variables, or those of an
    srun job step (SLURM_PROCID...; a batch script itself, outside any step, is one process), else (0, 1, 0)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def _slurm_rendezvous() -> None:
    """Under srun, where no launcher sets them: torch.distributed's env:// variables, the store on the step's first
    node at a port taken from the job id (MASTER_ADDR and MASTER_PORT, if set, are kept)."""
    rank, size, local = launched()
    env = os.environ
    env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local))
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        env["MASTER_ADDR"] = first_host(nodes)
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def first_host(nodes: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,09],cpu1" -> "gpu03"): scontrol's answer where it is
    installed, else read from the list (first_listed)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return first_listed(nodes)


def first_listed(nodes: str) -> str:
    """The first host of a SLURM node list in its compact form: up to the first comma outside brackets, each
    bracketed list of numbers and ranges read as its first number."""
    host, k = "", 0
    while k < len(nodes) and nodes[k] != ",":
        if nodes[k] == "[":
            close = nodes.index("]", k)
            host += nodes[k + 1 : close].split(",")[0].split("-")[0]
            k = close + 1
        else:
            host, k = host + nodes[k], k + 1
    return host


_WORLD: World | None = None


def world() -> World:
    """This process's place in the run: alone, or one of several started by a launcher, all joined through the
    launcher's key-value store (torch.distributed's env:// rendezvous; under srun, process 0 hosts it). Only small
    messages pass between processes, so no process group is formed."""
    global _WORLD
    rank, size, local = launched()
    if size <= 1:
        return World()
    if _WORLD is None:
        import torch.distributed as dist

        if "WORLD_SIZE" not in os.environ:
            _slurm_rendezvous()
        store, _, _ = next(dist.rendezvous("env://"))
        _WORLD = World(rank, size, local, _this_attempt(store, rank, size))
    return _WORLD


JOIN_SECONDS = 600.0  # how long process 0 waits for the others to join


def _this_attempt(store, rank: int, size: int):
    """The store under a prefix only this attempt's processes know. A launcher that restarts the processes
    (torchrun --max-restarts) keeps its store, and the keys the attempt before left in it: each process other than
    0 says hello with a fresh nonce, and process 0 answers every hello it sees with this attempt's fresh token until
    each process has acknowledged the token."""
    import torch.distributed as dist

    if rank > 0:
        nonce = uuid.uuid4().hex
        store.set(f"fastgrok/hello/{rank}", nonce)
        token = store.get(f"fastgrok/welcome/{nonce}").decode()
        store.set(f"fastgrok/{token}/joined/{rank}", "1")
        return dist.PrefixStore(f"fastgrok/{token}/", store)
    token, waiting, end = uuid.uuid4().hex, set(range(1, size)), time.monotonic() + JOIN_SECONDS
    while waiting:
        for r in sorted(waiting):
            if store.check([f"fastgrok/{token}/joined/{r}"]):
                waiting.discard(r)
            elif store.check([f"fastgrok/hello/{r}"]):
                store.set(f"fastgrok/welcome/{store.get(f'fastgrok/hello/{r}').decode()}", token)
        if time.monotonic() > end:
            raise ConfigError(f"process {min(waiting)} of {size} did not join within {JOIN_SECONDS:.0f} s")
        time.sleep(0.02)
    return dist.PrefixStore(f"fastgrok/{token}/", store)


def announce(w: World, key: str, value: str) -> None:
    w.store.set(key, value)


def wait_for(w: World, key: str) -> str:
    return w.store.get(key).decode()


def post(w: World, message: dict) -> None:
    """Tell process 0 something (a population written, this process finished): the n-th post of the run. Where
    the store is gone (its host, process 0 under srun, stopped), the message is dropped: the journal has it."""
    try:
        n = w.store.add("posts", 1)
        w.store.set(f"post/{n}", json.dumps(message))
    except RuntimeError:  # torch.distributed.DistError
        pass


def launcher_id() -> str | None:
    """The name the launcher gives this run, the same in every attempt of it: torchrun's rendezvous id
    (--rdzv-id; a fresh one per --standalone launch), or the SLURM job's id (the same when it is requeued)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun:" + os.environ["TORCHELASTIC_RUN_ID"]
    if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return "slurm:" + os.environ["SLURM_JOB_ID"]
    return None


def restarted_run(w: World, out: Path | None, runs: Path = Path("runs")) -> Path | None:
    """The run that an earlier attempt of this launch began (torchrun --max-restarts restarting its processes, a
    requeued SLURM job), to resume rather than start again: `out`, or without one the run under `runs`, whose
    config.json names this launcher id. torchrun's default id 'none' names no launch, so it counts only on a restart
    (TORCHELASTIC_RESTART_COUNT > 0). Process 0 decides and tells the others."""
    if w.rank > 0:
        found = wait_for(w, "restarted")
        return Path(found) if found else None
    found, name = None, launcher_id()
    if name is not None and (name != "torchrun:none" or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0):
        for run in [out] if out is not None else sorted(runs.glob("*"), reverse=True):
            try:
                if json.loads((Path(run) / "config.json").read_text()).get("launcher") == name:
                    found = Path(run)
                    break
            except (OSError, ValueError):
                continue
    if w.shared:
        announce(w, "restarted", str(found or ""))
    return found


class StepCounter:
    """A process's model-steps, added to the run's count in the store about once a second, for process 0's
    progress bar."""

    def __init__(self, w: World):
        self.world, self.pending, self.sent = w, 0, time.monotonic()

    def add(self, n: int, now: bool = False) -> None:
        self.pending += n
        if self.pending and (now or time.monotonic() - self.sent >= 1.0):
            try:
                self.world.store.add("steps", self.pending)
            except RuntimeError:  # the store is gone (post): the progress it fed is gone too
                pass
            self.pending, self.sent = 0, time.monotonic()


class Inbox:
    """Process 0's reading of the others' posts, in the order they were made, and of their model-steps."""

    def __init__(self, w: World):
        self.world, self.read, self.finished = w, 0, {}  # finished: rank -> its status
        self.counted = 0

    def steps(self) -> int:
        """The others' model-steps since the last call."""
        total = self.world.store.add("steps", 0)
        new, self.counted = total - self.counted, total
        return new

    def new(self) -> list[dict]:
        count = self.world.store.add("posts", 0)
        out = []
        while self.read < count:
            self.read += 1
            message = json.loads(self.world.store.get(f"post/{self.read}"))
            if message["kind"] == "finished":
                self.finished[message["rank"]] = message["status"]
            out.append(message)
        return out

    def all_complete(self) -> bool:
        return len(self.finished) == self.world.size - 1 and all(s == "complete" for s in self.finished.values())

    def wait_all(self, receive, timeout: float, stop=None) -> None:
        """Call `receive` (which reads the new posts and steps) until every other process has said it finished,
        `timeout` seconds pass (a process that died says nothing: what it saved is in its journal) or a stop is
        asked, then once more for the steps counted last."""
        end = time.monotonic() + timeout
        receive()
        while (len(self.finished) < self.world.size - 1 and time.monotonic() < end
               and not (stop is not None and stop.asked)):
            time.sleep(0.1)
            receive()
        receive()


def fail_everywhere(w: World, message: str) -> None:
    """Process 0 could not start the run: tell the others, which wait for its setup, before raising."""
    announce(w, "setup", json.dumps({"error": message}))
    raise ConfigError(message)


def publish(w: World, out: Path, jobs: list[dict], **setup) -> None:
    """Process 0: the run directory, the populations to train (each's models, name, whether it continues from its
    save, and cost) and what every process must agree on."""
    announce(w, "setup", json.dumps({"out": str(out), "jobs": jobs, **setup}, default=str))


def setup(w: World) -> dict:
    """A process other than 0: process 0's setup (publish), once the run directory it made is visible here."""
    theirs = json.loads(wait_for(w, "setup"))
    if "error" in theirs:
        raise ConfigError(theirs["error"])
    out = Path(theirs["out"])
    if not (out / "config.json").exists():
        raise ConfigError(f"process {w.rank} cannot see the run directory {out} that process 0 made: give --out "
                          "on a filesystem every process shares")
    return theirs


def check_agrees(w: World, theirs: dict, ours: dict) -> None:
    """A process other than 0, before it trains: the command (grid, settings) and the kind of device must be
    process 0's."""
    for key, what in (("grid", "its grid options"), ("settings", "its settings"), ("device", "its kind of device")):
        if key in ours and json.dumps(theirs[key], sort_keys=True) != json.dumps(ours[key], sort_keys=True, default=str):
            raise ConfigError(f"process {w.rank} differs from process 0 in {what}: every process must run the same "
                              f"command on the same kind of device ({key}: {ours[key]} against {theirs[key]})")


def mine(w: World, jobs: list[dict]) -> list[dict]:
    """This process's share of the published jobs."""
    from fastgrok.planner import balance

    owner = balance([j["cost"] for j in jobs], w.size)
    return [j for j, rank in zip(jobs, owner) if rank == w.rank]


class ProcessLog:
    """A process's own account in the run (logs/process-<rank>.log): where it runs, each population it trains and
    saves, with its rate, and how it ended. Appended to, so that a resumed run's attempts follow each other."""

    def __init__(self, w: World, out: Path, about: str):
        (out / "logs").mkdir(exist_ok=True)
        self.path = out / "logs" / f"process-{w.rank}.log"
        self.began = time.perf_counter()
        self.write(f"process {w.rank} of {w.size} on {socket.gethostname()} (pid {os.getpid()}): {about}")

    def write(self, line: str) -> None:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(self.path, "a") as f:
            f.write(f"{stamp} {line}\n")

    def began_population(self, name: str, models: int, width: int, step: int) -> None:
        self.write(f"{name}: {models} models of width {width}, " + (f"from its save at step {step}" if step
                                                                     else "from the start"))

    def saved(self, name: str, step: int, steps: int, model_steps: int, seconds: float) -> None:
        where = "finished" if step == steps else f"saved at step {step} of {steps}"
        self.write(f"{name}: {where}, {model_steps / max(seconds, 1e-9):,.0f} model-steps/s")

    def finished(self, status: str) -> None:
        self.write(f"{status} after {time.perf_counter() - self.began:,.1f} s")


class RankWriter:
    """What a process other than 0 writes: its populations' files, each then entered in its journal and announced
    to process 0, which records them in config.json and models.csv (RunWriter.record); then that it finished, and
    how."""

    def __init__(self, w: World, out):
        self.world, self.out = w, Path(out)
        self.config = {"written": []}
        (self.out / "logs").mkdir(exist_ok=True)
        self.journal = self.out / JOURNALS.replace("*", f"process-{w.rank}")

    def add_population(self, rows, history, weights, state=None, name: str | None = None) -> str:
        write_population(self.out, name, history, weights, state)
        cells, steps = [r.cells() for r in rows], rows[0].steps if rows else 0
        entry = written_entry(name, cells, steps, state is not None)
        self.config["written"] = [e for e in self.config["written"] if e["name"] != name] + [entry]
        message = {"kind": "population", **entry, "cells": cells}
        with open(self.journal, "a") as f:
            f.write(json.dumps(message) + "\n")
            f.flush()
            os.fsync(f.fileno())
        post(self.world, message)
        return name

    def finish(self, status: str, **extra) -> None:
        post(self.world, {"kind": "finished", "rank": self.world.rank, "status": status})

    def close(self) -> None:
        pass

