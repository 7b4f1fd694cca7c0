"""The memory planner: how a grid is split into populations that fit the device.

A population holds models of one width (a step must share the tensors' shapes) and tasks of one kind (the same
inputs: task_kind). Its device memory is, per model, its tensors with their gradients and two Adam moments (the
family's Specs) and its data (pair order, training indices and labels); beside them the step's working memory, which
each backend states (Backend.step_bytes), and the evaluation's, which stays within eval_limit. The planner sizes
each population to the largest number of models that fits a share of the device's memory (BUDGETS).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrok.config import AXES, Grid
from fastgrok.data import check_training_sets, pair_count, train_size
from fastgrok.errors import ConfigError
from fastgrok.families import family_of
from fastgrok.ipr import natural_basis

# A CPU evaluates chunks of models whose working memory fits its last-level cache (as the torch step's pieces):
# on the 2-core AMD EPYC development machine (32 MB L3) 16 MiB evaluated the cpu-demo population in 50 ms and 16
# models of p 97, N 500 in 270 ms, against 132 and 612 ms with 256 MiB (4 MiB: 64, 285).
CPU_EVAL_BYTES = 16 << 20
# The share of a device's memory a population may take, and how `fastgrok train --dry-run` says it
BUDGETS = {"cuda": (0.8, "80% of its free memory"), "cpu": (0.5, "half the available host memory")}


def eval_limit(device: torch.device | str) -> int:
    """Bytes Population.evaluate works in at once: 2 GiB on a GPU, CPU_EVAL_BYTES on a CPU."""
    return CPU_EVAL_BYTES if torch.device(device).type == "cpu" else 1 << 31


def tensor_bytes(settings, width: int) -> int:
    """One model's tensors: each trained one with its gradient and two Adam moments, buffers once (fp32)."""
    specs = family_of(settings).tensors(settings, width).values()
    return 4 * sum(math.prod(s.shape) * (4 if s.trained else 1) for s in specs)


def data_bytes(d_max: int, num_pairs: int, batch_size: int | None = None, terms: int = 2) -> int:
    """One model's data: the int64 order of the inputs, the training examples' operands and labels, the valid
    mask and per-model scalars (seeds, counts, hyper-parameters); with minibatches the epoch order and a batch's
    operands and labels."""
    data = 8 * num_pairs + 8 * (terms + 1) * d_max + d_max + 256
    if batch_size is not None:
        data += 8 * d_max + 8 * (terms + 1) * min(d_max, batch_size)
    return data


def bytes_per_model(settings, width: int, d_max: int, num_pairs: int, engine, dropout: bool = False,
                    device: torch.device | str = "cuda") -> int:
    """One model alone, beside its evaluation: its tensors, its data and its step's working memory."""
    d = min(d_max, settings.batch_size or d_max)
    return (tensor_bytes(settings, width) + data_bytes(d_max, num_pairs, settings.batch_size, settings.terms)
            + engine.step_bytes(settings, width, d, 1, torch.device(device), dropout))


def population_bytes(settings, width: int, d_max: int, num_pairs: int, models: int, engine, dropout: bool = False,
                     device: torch.device | str = "cuda") -> int:
    """Device memory of a population of `models` models of this width and largest training set: their tensors
    and data, the step's working memory as `engine` states it, the evaluation's (at most eval_limit: chunks
    of models, or spans of one model's pairs) and the task's table."""
    d = min(d_max, settings.batch_size or d_max)  # the examples of a step
    own = tensor_bytes(settings, width) + data_bytes(d_max, num_pairs, settings.batch_size, settings.terms)
    step = engine.step_bytes(settings, width, d, models, torch.device(device), dropout)
    evaluation = min(eval_limit(device), models * num_pairs * engine.eval_bytes(settings, width))
    table = 8 * (settings.terms + 1) * num_pairs  # every input's operands and label, once for the population
    return models * own + step + evaluation + table


def models_that_fit(settings, width: int, d_max: int, num_pairs: int, device: torch.device, budget: int, engine,
                    dropout: bool = False) -> int:
    """The most models of this width one population can hold in `budget` bytes (population_bytes, which grows
    with the models); ConfigError if not even one fits."""
    def size(models: int) -> int:
        return population_bytes(settings, width, d_max, num_pairs, models, engine, dropout, device)

    if size(1) > budget:
        raise ConfigError(
            f"one model of width {width} (p {settings.p}"
            + (f", {settings.terms} operands: {num_pairs:,} inputs" if settings.terms != 2 else "")
            + f") needs about {size(1) / 2**30:,.1f} GiB, more "
            f"than the {budget / 2**30:.1f} GiB this {device.type} device can give a population"
        )
    fits, too_many = 1, 2
    while size(too_many) <= budget:
        fits, too_many = too_many, 2 * too_many
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if size(mid) <= budget else (fits, mid)
    return fits


# What a run keeps in host memory per model as it trains: its models.csv row, as a ModelRow and as cells (1.7 KB
# measured with tracemalloc, Python 3.11, 2026-12-02); rounded up.
HOST_BYTES_PER_MODEL = 2048
# A model's share of the files beside its weights: its history rows (int32 model and step, 8 float64 metrics: 72 B
# a logged step, before compression) and its models.csv line (about 200 B).
HISTORY_BYTES_PER_LOG, TABLE_BYTES = 72, 200


def run_bytes(grid: Grid, settings) -> tuple[int, int, int]:
    """About what a run writes to disk: its weights (each model's tensors, fp32), its history and models.csv."""
    family = family_of(settings)
    per_value = len(grid) // len(grid.axes["width"])  # models of each width
    weights = per_value * sum(4 * sum(math.prod(spec.shape) for spec in family.tensors(settings, w).values())
                              for w in grid.axes["width"])
    logs = len({*range(0, settings.steps + 1, settings.log_every), settings.steps})
    return weights, len(grid) * logs * HISTORY_BYTES_PER_LOG, len(grid) * TABLE_BYTES


def check_room(grid: Grid, settings, out: Path | None) -> None:
    """Refuse, with the numbers, a grid whose run the disk at `out` (default: runs/ here) could not hold, or whose
    bookkeeping would not fit the host's memory: counted from the grid's axes, before anything is built."""
    weights, history, table = run_bytes(grid, settings)
    where = Path(out) if out is not None else Path("runs")
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if weights + history + table > free:
        raise ConfigError(f"{len(grid):,} models would write about {bytes_text(weights + history + table)} "
                          f"({bytes_text(weights)} of weights, {bytes_text(history)} of history) to {where}, which "
                          f"has {bytes_text(free)} free; a smaller grid, or --out on a larger disk")
    host, available = len(grid) * HOST_BYTES_PER_MODEL, host_memory()
    if host > available:
        raise ConfigError(f"{len(grid):,} models: their models.csv rows alone take about {bytes_text(host)} of host "
                          f"memory while training, more than the {bytes_text(available)} available; split the grid "
                          "into several runs")


def bytes_text(nbytes: int) -> str:
    """Bytes in the largest binary unit that leaves a whole part: 3.2 GiB, 940.5 MiB, 12.0 KiB."""
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.1f} {unit}"
    return f"{nbytes} B"


def host_memory() -> int:
    """The host memory available (/proc/meminfo's MemAvailable; 16 GiB where it cannot tell)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 16 << 30


def memory_budget(device: torch.device) -> int:
    """Bytes a population may use: BUDGETS's share of the free GPU memory or of the available host memory."""
    share = BUDGETS[device.type][0]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(share * free)
    return int(share * host_memory())


@dataclass(frozen=True)
class Group:
    """The models of a grid with one width (its index in the width axis), tasks of one kind (their indices in the op
    axis, the last in AXES; task_kind) and one training-set size d (the alphas, by index, that give it), in model-id
    order: a lattice of the grid's ids, so that any run of it is found by arithmetic, never by listing the grid's
    models."""

    grid: Grid
    width: int
    alphas: tuple[int, ...]
    d: int
    ops: tuple[int, ...] = (0,)

    def __len__(self) -> int:
        return len(self.grid.axes["xi"]) * len(self.alphas) * self._inner * len(self.ops)

    @property
    def _inner(self) -> int:
        """Models per (xi, alpha, width, op): the axes between width and op in AXES."""
        return math.prod(len(self.grid.axes[a]) for a in AXES[AXES.index("width") + 1 : AXES.index("op")])

    def ids(self, start: int, stop: int) -> list[int]:
        """The model ids at positions [start, stop) of the group."""
        inner, axes, tasks = self._inner, self.grid.axes, len(self.ops)
        out = []
        for k in range(start, stop):
            xi, rest = divmod(k, len(self.alphas) * inner * tasks)
            alpha, rest = divmod(rest, inner * tasks)
            tail, task = divmod(rest, tasks)
            out.append((((xi * len(axes["alpha"]) + self.alphas[alpha]) * len(axes["width"]) + self.width) * inner
                        + tail) * len(axes["op"]) + self.ops[task])
        return out


@dataclass(frozen=True)
class Planned:
    """One population of a plan: runs (group, start, stop) of its width's groups, in the planner's order."""

    width: int
    parts: tuple[tuple[Group, int, int], ...]
    ops: tuple[str | None, ...] = (None,)  # its tasks (one kind): the grid's ops, or None for the run's

    def __len__(self) -> int:
        return sum(stop - start for _, start, stop in self.parts)

    @property
    def sizes(self) -> tuple[int, int]:
        """The smallest and largest training set of its models."""
        return min(g.d for g, _, _ in self.parts), max(g.d for g, _, _ in self.parts)

    def ids(self) -> list[int]:
        return [i for group, start, stop in self.parts for i in group.ids(start, stop)]

    def examples(self, batch_size: int | None = None) -> int:
        """The examples a step of the population sees, over all its models."""
        return sum((stop - start) * min(group.d, batch_size or group.d) for group, start, stop in self.parts)

    def cost(self, settings) -> int:
        """The FLOPs its training takes (the family's count of a model-step, times the steps): what shares() balances.
        From the grid and settings alone, so that every process of a run computes the same shares."""
        settings = settings.with_op(self.ops[0])  # tasks of a kind: the same inputs, the same FLOPs
        return settings.steps * sum((stop - start) * step_flops(settings, self.width, group.d)
                                    for group, start, stop in self.parts)

    def sample(self, k: int) -> list[int]:
        """About k of its model ids, evenly spaced in its order (without listing the others)."""
        step = max(1, math.ceil(len(self) / k))
        out, offset = [], 0
        for group, start, stop in self.parts:
            first = start + (-offset) % step
            out += [group.ids(j, j + 1)[0] for j in range(first, stop, step)]
            offset += stop - start
        return out


def plan(grid: Grid, settings, device: torch.device, engine, budget: int | None = None,
         most: int | None = None) -> list[Planned]:
    """Split a grid into populations: one width each, as many models as fit the memory budget, and at most `most`
    (--population-size: smaller populations, for a run spread over more processes than the memory alone would
    make populations). The work grows with the populations, not with the models: a population is a few runs of
    lattices of the grid's ids."""
    if most is not None and most < 1:
        raise ConfigError(f"--population-size must be at least 1, got {most}")
    budget = memory_budget(device) if budget is None else budget
    dropout = any(v > 0 for v in grid.axes["dropout"])
    kinds: dict[tuple, list[int]] = {}
    for o, op in enumerate(grid.axes["op"]):
        kinds.setdefault(task_kind(settings.with_op(op)), []).append(o)
    populations = []
    for ops in kinds.values():
        populations += _plan_tasks(grid, settings.with_op(grid.axes["op"][ops[0]]), tuple(ops), device, engine,
                                   budget, most, dropout)
    return populations


def task_kind(settings) -> tuple[bool, str]:
    """Tasks of one kind share a population, each model with its own labels: the same inputs (every tuple of
    residues; div leaves out y = 0) and the same basis in which their neurons' IPR is read (ipr.natural_basis)."""
    return settings.op == "div", natural_basis(settings)


def _plan_tasks(grid: Grid, settings, ops: tuple[int, ...], device, engine, budget: int, most: int | None,
                dropout: bool):
    """plan() of the models of tasks of one kind (indices in the op axis; settings: the first's)."""
    check_training_sets(grid.axes["alpha"], settings)
    num_pairs = pair_count(settings.op, settings.p, settings.terms)
    by_size: dict[int, list[int]] = {}
    for k, alpha in enumerate(grid.axes["alpha"]):
        by_size.setdefault(train_size(num_pairs, alpha), []).append(k)
    names = tuple(grid.axes["op"][o] for o in ops)
    populations = []
    for w, width in enumerate(grid.axes["width"]):
        # by training-set size, so that a population (and a CPU chunk of one) holds models of similar D; largest
        # first, because a GPU starts a launch's programs roughly in order and the backward's take time in
        # proportion to D: the longest then start first and the shortest fill the end, instead of a last wave of
        # the longest ones (the 1,156-model diagrams mix alpha 0.1 to 0.9 in one population)
        groups = [Group(grid, w, tuple(alphas), d, ops) for d, alphas in sorted(by_size.items(), reverse=True)]
        per_pop = models_that_fit(settings, width, groups[0].d, num_pairs, device, budget, engine, dropout)
        per_pop = min(per_pop, most or per_pop)
        parts, room = [], per_pop
        for group in groups:
            start = 0
            while start < len(group):
                stop = min(len(group), start + room)
                parts.append((group, start, stop))
                room -= stop - start
                start = stop
                if room == 0:
                    populations.append(Planned(width, tuple(parts), names))
                    parts, room = [], per_pop
        if parts:
            populations.append(Planned(width, tuple(parts), names))
    return populations


def shares(populations: list[Planned], settings, processes: int) -> list[int]:
    """The process (rank) that trains each population of a plan, for a run spread over `processes` (balance of
    their costs). Only the plan decides it, so a population is the same one whatever the number of processes."""
    return balance([p.cost(settings) for p in populations], processes)


def share_notes(costs: list[int], processes: int, models: int) -> list[str]:
    """What to say about populations of these costs shared among `processes`: processes left without one (each
    population trains on one process), or a most loaded process far above the mean; either way the
    --population-size that gives each process a few populations, which balance() then evens out."""
    if processes <= 1:
        return []
    size = math.ceil(models / (4 * processes))
    if len(costs) < processes:
        idle = processes - len(costs)
        return [f"{idle} of the {processes} processes {'has' if idle == 1 else 'have'} no population to train (the "
                f"plan has {len(costs)}): --population-size {size} gives each a few"]
    owner = balance(costs, processes)
    loads = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(processes)]
    mean = sum(loads) / processes
    if max(loads) > 1.1 * mean:
        return [f"the most loaded process has {max(loads) / mean - 1:.0%} more work than the mean, and the run waits "
                f"for it: --population-size {size} gives each process a few populations to even out"]
    return []


def balance(costs: list[int], processes: int) -> list[int]:
    """The process that takes each job of these costs: the most costly first, each to the process with the least
    cost so far (the lowest rank on a tie)."""
    if processes < 1:
        raise ConfigError(f"--world-size must be at least 1, got {processes}")
    loads, owner = [0] * processes, [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(processes), key=lambda r: (loads[r], r))
        owner[k], loads[rank] = rank, loads[rank] + costs[k]
    return owner


def job_cost(grid: Grid, settings, ids: list[int], steps: int) -> int:
    """The FLOPs of `steps` steps of a population of these models (Planned.cost, for any list of models: a
    resumed run's, some of whose populations continue from a save)."""
    hypers = [grid.model(i) for i in ids]
    settings = settings.with_op(hypers[0].op)  # a population's tasks are of one kind: the same inputs
    pairs = pair_count(settings.op, settings.p, settings.terms)
    return steps * sum(step_flops(settings, h.width, train_size(pairs, h.alpha)) for h in hypers)


def step_flops(settings, width: int, d: int) -> int:
    """The family's FLOPs of one model-step of a model with d training examples (a minibatch of them, with one)."""
    return family_of(settings).flops(settings, width, min(d, settings.batch_size or d))


def job_bytes(grid: Grid, settings, ids: list[int], engine, device: torch.device) -> int:
    """Device memory of a population of these models (population_bytes; one width)."""
    hypers = [grid.model(i) for i in ids]
    settings = settings.with_op(hypers[0].op)
    pairs = pair_count(settings.op, settings.p, settings.terms)
    return population_bytes(settings, hypers[0].width, max(train_size(pairs, h.alpha) for h in hypers), pairs,
                            len(hypers), engine, any(v > 0 for v in grid.axes["dropout"]), device)


def check_fits(jobs: list[list[int]], grid: Grid, settings, engine, device: torch.device, who: str) -> None:
    """Refuse, before training, a device that cannot hold the largest of the populations given it (planned on
    another process's device)."""
    budget = memory_budget(device)
    for ids in jobs:
        if (need := job_bytes(grid, settings, ids, engine, device)) > budget:
            raise ConfigError(f"{who} on {device} cannot hold its population of {len(ids)} models: it needs "
                              f"{bytes_text(need)}, and this device can give a population {bytes_text(budget)} "
                              f"({BUDGETS[device.type][1]}); free the device, or run every process on devices alike")
