"""The memory planner: how a grid is split into populations that fit the device.

A population holds models of one width (a step must share the tensors' shapes). Its device memory is, per model,
its tensors with their gradients and two Adam moments (the family's Specs) and its data (pair order, training
indices and labels); beside them the step's working memory, which each backend states (Backend.step_bytes), and
the evaluation's, which stays within eval_limit. The planner sizes each population to the largest number of models
that fits a share of the device's memory (BUDGETS).
"""

from __future__ import annotations

import math

import torch

from fastgrok.data import check_training_sets, pair_count, train_size
from fastgrok.errors import ConfigError
from fastgrok.families import family_of

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


def data_bytes(d_max: int, num_pairs: int, batch_size: int | None = None) -> int:
    """One model's data: the int64 pair order, training indices and labels, the valid mask and per-model scalars
    (seeds, counts, hyper-parameters); with minibatches the epoch order and a batch's indices and labels."""
    data = 8 * num_pairs + 8 * 3 * d_max + d_max + 256
    if batch_size is not None:
        data += 8 * d_max + 8 * 3 * min(d_max, batch_size)
    return data


def bytes_per_model(settings, width: int, d_max: int, num_pairs: int, engine, dropout: bool = False,
                    device: torch.device | str = "cuda") -> int:
    """One model alone, beside its evaluation: its tensors, its data and its step's working memory."""
    d = min(d_max, settings.batch_size or d_max)
    return (tensor_bytes(settings, width) + data_bytes(d_max, num_pairs, settings.batch_size)
            + engine.step_bytes(settings, width, d, 1, torch.device(device), dropout))


def population_bytes(settings, width: int, d_max: int, num_pairs: int, models: int, engine, dropout: bool = False,
                     device: torch.device | str = "cuda") -> int:
    """Device memory of a population of `models` models of this width and largest training set: their tensors
    and data, the step's working memory as `engine` states it, and the evaluation's (at most eval_limit: chunks
    of models, or spans of one model's pairs)."""
    d = min(d_max, settings.batch_size or d_max)  # the examples of a step
    own = tensor_bytes(settings, width) + data_bytes(d_max, num_pairs, settings.batch_size)
    step = engine.step_bytes(settings, width, d, models, torch.device(device), dropout)
    evaluation = min(eval_limit(device), models * num_pairs * engine.eval_bytes(settings, width))
    return models * own + step + evaluation


def models_that_fit(settings, width: int, d_max: int, num_pairs: int, device: torch.device, budget: int, engine,
                    dropout: bool = False) -> int:
    """The most models of this width one population can hold in `budget` bytes (population_bytes, which grows
    with the models); ConfigError if not even one fits."""
    def size(models: int) -> int:
        return population_bytes(settings, width, d_max, num_pairs, models, engine, dropout, device)

    if size(1) > budget:
        raise ConfigError(
            f"one model of width {width} (p {settings.p}) needs about {size(1) / 2**30:,.1f} GiB, more "
            f"than the {budget / 2**30:.1f} GiB this {device.type} device can give a population"
        )
    fits, too_many = 1, 2
    while size(too_many) <= budget:
        fits, too_many = too_many, 2 * too_many
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if size(mid) <= budget else (fits, mid)
    return fits


def memory_budget(device: torch.device) -> int:
    """Bytes a population may use: BUDGETS's share of the free GPU memory or of the available host memory
    (8 GiB where /proc/meminfo cannot tell)."""
    share = BUDGETS[device.type][0]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(share * free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(share * int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return 8 << 30


def plan(hypers: list, settings, device: torch.device, engine, budget: int | None = None) -> list[list[int]]:
    """Split a grid into populations: one width each, as many models as fit the memory budget."""
    check_training_sets(hypers, settings)
    budget = memory_budget(device) if budget is None else budget
    num_pairs = pair_count(settings.op, settings.p)
    by_width: dict[int, list[int]] = {}
    for i, h in enumerate(hypers):
        by_width.setdefault(h.width, []).append(i)
    populations = []
    for width, ids in by_width.items():
        # by training-set size, so that a population (and a CPU chunk of one) holds models of similar D; largest
        # first, because a GPU starts a launch's programs roughly in order and the backward's take time in
        # proportion to D: the longest then start first and the shortest fill the end, instead of a last wave of
        # the longest ones (the 1,156-model diagrams mix alpha 0.1 to 0.9 in one population)
        ids.sort(key=lambda i: train_size(num_pairs, hypers[i].alpha), reverse=True)
        d_max = train_size(num_pairs, hypers[ids[0]].alpha)
        per_pop = models_that_fit(settings, width, d_max, num_pairs, device, budget, engine,
                                  any(hypers[i].dropout > 0 for i in ids))
        populations += [ids[i : i + per_pop] for i in range(0, len(ids), per_pop)]
    return populations
