"""Run-level analysis: neuron IPR, pruning by IPR, phase diagrams and training curves.

Every function reads a run directory, works batched over models and neurons on the chosen device, and writes
its table (parquet or csv) and figure (PNG) into the run directory.
"""

from __future__ import annotations

import csv
import itertools
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastgrok import plots, process
from fastgrok.config import AXES, Grid, axis_text, plural
from fastgrok.data import generator
from fastgrok.device import resolve_device
from fastgrok.errors import ConfigError
from fastgrok.families import family_of
from fastgrok.ipr import FFTS, HIGH_IPR, analytic_similarity, in_basis, natural_basis, neuron_ipr, neuron_spectra
from fastgrok.phases import PHASES
from fastgrok.population import METRICS
from fastgrok.results import (csv_cell, load_populations, read_config, read_history, read_models, read_weights,
                              recipe, settings_of, status, write_atomic, write_csv)

# --order -> what the table and the figure call it
ORDERS = {"low": "lowest-IPR neurons first", "high": "highest-IPR neurons first",
          "random": "neurons in a random order"}


def unfinished(run: Path) -> str | None:
    """None for a complete run; otherwise what of it is not trained yet (an interrupted run, one still training,
    or one that stopped without finishing): its part-trained models are analysed at the step they reached, and its
    unstarted ones not at all."""
    config = read_config(run)
    if config["status"] == "complete":
        return None
    rows, steps, total = read_models(run), config["settings"]["steps"], len(Grid(config["grid"]))
    short, missing = sum(r.steps < steps for r in rows), total - len(rows)
    if not short and not missing:
        return None
    parts = [f"{short} part-trained (analysed at the step they reached)"] * bool(short)
    parts += [f"{missing} not started (left out)"] * bool(missing)
    return (f"this run is {status(run, config)}: of its {total} {plural('model', total)}, {' and '.join(parts)}; "
            f"`fastgrok train --resume {run}` finishes it")


def select_models(rows: list[dict], spec: str | None) -> list[int] | None:
    """'0,4,9' -> those ids; a phase name -> every model in it; None or 'all' -> None (every model)."""
    if spec is None or spec == "all":
        return None
    if spec in (*PHASES, "diverged"):
        chosen = [r.model for r in rows if r.phase == spec]
        if not chosen:
            raise ConfigError(f"no model of this run is in phase {spec!r}")
        return chosen
    try:
        chosen = list(dict.fromkeys(int(v) for v in spec.split(",")))  # in the order given, each once
    except ValueError:
        raise ConfigError(f"--models: give model ids like 0,4,9, a phase name, or all; got {spec!r}") from None
    known = {r.model for r in rows}
    missing = [m for m in chosen if m not in known]
    if missing:
        raise ConfigError(f"model {missing[0]} is not in this run (it has models 0..{max(known)})")
    return chosen


def update_models_csv(run: Path, columns: dict[str, dict[int, object]]) -> None:
    """Add (or replace) per-model columns of models.csv."""
    path = Path(run) / "models.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames), list(reader)
    for name, values in columns.items():
        if name not in fields:
            fields.append(name)
        for row in rows:
            value = values.get(int(row["model"]), row.get(name, ""))
            row[name] = f"{value:.6g}" if isinstance(value, float) else value
    write_csv(path, [fields, *([r.get(c, "") for c in fields] for r in rows)])  # holds the training results: never torn


def ipr(run: Path, fft: str = "rfft", threshold: float = HIGH_IPR, models: str | None = None,
        device: str = "cpu", progress: Callable[[int, int], None] | None = None, basis: str | None = None) -> dict:
    """Per-neuron IPR of every (selected) model -> ipr.parquet, IPR columns in models.csv, ipr-hist.png, and
    ipr-spectra.png (the neurons' power spectra of the selected models, up to 9, or of a model per phase), with
    the residues in `basis`'s order (default: the run's natural one, fastgrok.ipr). For the 2-layer MLP also each
    neuron's similarity to the closest neuron of the analytic solution (ipr.analytic_similarity) and its mean
    over a model's live neurons (models.csv's analytic_similarity). progress(done, total) is called after each
    piece of models read."""
    if fft not in FFTS:
        raise ConfigError(f"unknown --fft {fft!r}; choose one of {', '.join(FFTS)}")
    if not 0.0 < threshold < 1.0:  # an IPR lies in (0, 1]: outside, every neuron or none would count as high
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold:g}")
    device = resolve_device(device)
    run = Path(run)
    rows = read_models(run)
    config = read_config(run)
    settings, grid = settings_of(config), Grid(config["grid"])
    family = family_of(settings)
    if basis is not None:
        in_basis({}, basis, settings.p)  # a bad basis is refused before any work

    def parts_of(tensors, parts=None):  # the units' weight vectors (ipr_parts, or `parts`) in the basis asked for:
        # a piece of models is one population's, tasks of one natural basis (planner.task_kind): the default
        task = settings.with_op(grid.model(int(tensors["model"][0])).op)
        return in_basis(family.ipr_parts(tensors) if parts is None else parts,
                        natural_basis(task) if basis is None else basis, settings.p)
    chosen = select_models(rows, models)
    phase_of = {r.model: r.phase for r in rows}
    table = {}
    per_model = {column: {} for column in IPR_COLUMNS}
    extra = {}  # the family's other weight vectors' mean IPR per model (Family.ipr_extra), by column
    values: dict[int, np.ndarray] = {}
    bn_points: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # with BatchNorm: each model's (IPR, |BN weight|)
    for weights in read_weights(run, set(chosen) if chosen is not None else None):  # a piece at a time
        ids = weights["model"].tolist()
        tensors = {k: v.to(device) for k, v in weights.items()}
        parts = parts_of(tensors)
        result = neuron_ipr(parts, fft)
        for name, part in family.ipr_extra(tensors).items():
            column = extra.setdefault(f"{name}_ipr", {})
            column.update(zip(weights["model"].tolist(), neuron_ipr({name: part}, fft).model_mean().tolist()))
        high, mean = result.high_fraction(threshold).tolist(), result.model_mean().tolist()
        dead_count = result.dead.sum(1).tolist()
        neuron_mean, dead = result.mean.cpu().numpy(), result.dead.cpu().numpy()
        B, N = neuron_mean.shape
        columns = {"model": np.repeat(ids, N), "neuron": np.tile(np.arange(N), B),
                   **{f"ipr_{k}": v.cpu().numpy().ravel() for k, v in result.parts.items()},
                   "ipr": neuron_mean.ravel(), "dead": dead.ravel()}
        for k, (column, (bn_parts, weight)) in enumerate(family.bn_pairs(tensors).items()):
            # BatchNorm's weight per unit, and how it ranks with the IPR of the unit's weights beside it
            units = neuron_ipr(parts_of(tensors, bn_parts), fft).mean
            gamma = weight.abs()
            extra.setdefault(column, {}).update(zip(ids, rank_correlation(units, gamma).tolist()))
            if k == 0:  # the first pair is drawn, and the units' weights are kept per neuron
                columns["bn_weight"] = weight.cpu().numpy().ravel()
                for b, m in enumerate(ids):
                    live = ~torch.isnan(units[b]).cpu().numpy()
                    bn_points[m] = (units[b].cpu().numpy()[live], gamma[b].cpu().numpy()[live])
        if family.name == "mlp":  # its analytic solution's neurons: inputs then W
            similarity = analytic_similarity([t for name, (t, _) in parts.items() if name != "w"], parts["w"][0])
            columns["analytic_similarity"] = similarity.cpu().numpy().ravel()
            extra.setdefault("analytic_similarity", {}).update(zip(ids, torch.nanmean(similarity, 1).tolist()))
        for k, v in columns.items():
            table.setdefault(k, []).append(v)
        for b, m in enumerate(ids):  # bookkeeping only: the IPRs were computed above, batched
            per_model["mean_ipr"][m], per_model["high_ipr_fraction"][m] = mean[b], high[b]
            per_model["dead_neurons"][m] = dead_count[b]
            values[m] = neuron_mean[b][~dead[b]]
        if progress is not None:
            progress(len(values), len(rows) if chosen is None else len(chosen))
    columns = {k: np.concatenate(v) for k, v in table.items()}
    arrays = {k: pa.array(v, mask=np.isnan(v)) if v.dtype.kind == "f" else pa.array(v) for k, v in columns.items()}
    # missing IPR (zero vectors) are nulls, not NaN
    write_atomic(run / "ipr.parquet", lambda tmp: pq.write_table(pa.table(arrays), tmp))
    update_models_csv(run, {**per_model, **extra})
    if chosen is not None and len(chosen) <= 9:
        groups = {f"model {m} ({phase_of[m]})": values[m] for m in chosen}
    else:
        groups = {}
        for phase in (*PHASES, "diverged"):
            ids = [m for m in values if phase_of[m] == phase]
            if ids:
                groups[phase] = np.concatenate([values[m] for m in ids])
    plots.ipr_histograms(groups, run / "ipr-hist.png", f"neuron IPR (|{fft}|), {len(values):,} models")
    shown = chosen if chosen is not None and len(chosen) <= 9 else representatives(per_model["mean_ipr"], phase_of)
    panels = {}
    for weights in read_weights(run, set(shown)):  # a second read, of these few models only
        spectra = neuron_spectra(parts_of({k: v.to(device) for k, v in weights.items()}), fft).cpu().numpy()
        for b, m in enumerate(weights["model"].tolist()):
            live = spectra[b][~np.isnan(spectra[b]).all(1)]  # the neurons neuron_ipr calls live, in order
            panels[m] = live[np.argsort(-values[m], kind="stable")]
    panels = {f"model {m} ({phase_of[m]}), mean IPR {per_model['mean_ipr'][m]:.2f}": panels[m]
              for m in shown if len(panels.get(m, ()))}  # in the order chosen; a model with no live neuron has none
    if panels:
        plots.neuron_spectra(panels, run / "ipr-spectra.png", f"neurons' power spectra (|{fft}|^2), highest IPR on top")
    else:  # nothing to draw: no picture of an earlier selection is left to be taken for this one
        (run / "ipr-spectra.png").unlink(missing_ok=True)
    scatter = {f"model {m} ({phase_of[m]}), rank correlation {extra['bn_ipr_correlation'][m]:.2f}": bn_points[m]
               for m in shown if m in bn_points}
    if scatter:
        plots.ipr_vs_bn(scatter, run / "ipr-vs-bn.png", "BatchNorm weight against neuron IPR")
    summary = {}
    for phase in (*PHASES, "diverged"):
        ids = [m for m in values if phase_of[m] == phase]
        if ids:
            summary[phase] = {"models": len(ids),
                              "mean_ipr": float(np.mean([per_model["mean_ipr"][m] for m in ids])),
                              "high_ipr_fraction": float(np.mean([per_model["high_ipr_fraction"][m] for m in ids]))}
    return summary


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of a and b (B, N), over the entries where a is not NaN (ties
    ranked in order); NaN for a row with fewer than 3 such entries."""
    out = torch.full((a.shape[0],), float("nan"))
    for k in range(a.shape[0]):
        live = ~torch.isnan(a[k])
        if live.sum() < 3:
            continue
        ranks = [torch.argsort(torch.argsort(v[live], stable=True)).double() for v in (a[k], b[k])]
        out[k] = torch.corrcoef(torch.stack(ranks))[0, 1].item()
    return out


def representatives(mean_ipr: dict[int, float], phase_of: dict[int, str]) -> list[int]:
    """A model per phase, in the phases' order: the one of median mean IPR among that phase's models (a diverged
    model, or one without live neurons, is none)."""
    shown = []
    for phase in PHASES:
        ids = sorted((m for m, v in mean_ipr.items() if phase_of[m] == phase and np.isfinite(v)),
                     key=lambda m: (mean_ipr[m], m))
        if ids:
            shown.append(ids[(len(ids) - 1) // 2])
    return shown


def _prune_order(score: torch.Tensor, order: str, model_ids: list[int], seed: int) -> torch.Tensor:
    """(B, N) neuron indices in pruning order. Dead neurons (NaN) go first for 'low', last for 'high'."""
    if order == "random":
        return torch.stack([torch.randperm(score.shape[1], generator=generator(seed * 1_000_003 + m, "prune"))
                            for m in model_ids]).to(score.device)
    filled = torch.nan_to_num(score, nan=-1.0)
    return torch.argsort(filled, dim=1, descending=order == "high", stable=True)


@torch.no_grad()
def prune(run: Path, order: str = "low", models: str | None = None, every: int | None = None, seed: int = 0,
          device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Cumulative pruning by neuron IPR, no retraining: zero neuron k's U row, V row and W column (the same
    as dropping it: phi(0) = 0), and measure every metric after every `every`-th pruned neuron (default 1). All selected
    models of a population are evaluated together at each level. progress(done, total) is called after each
    level, counting model-levels. -> prune-ORDER.parquet, prune-ORDER.png."""
    if order not in ORDERS:
        raise ConfigError(f"unknown --order {order!r}; choose one of {', '.join(ORDERS)}")
    if every is not None and every < 1:
        raise ConfigError("--every must be at least 1")
    device = resolve_device(device)
    if device.type == "cpu":
        process.tune_cpu()
    run = Path(run)
    rows = read_models(run)
    chosen = select_models(rows, models)
    step = every or 1
    levels_of = lambda N: sorted(set(range(0, N + 1, step)) | {N})  # noqa: E731
    total = sum(len(levels_of(r.hyper.width)) for r in rows if chosen is None or r.model in chosen)
    done = 0
    curves: dict[int, dict[str, np.ndarray]] = {}
    for pop in load_populations(run, device, set(chosen) if chosen is not None else None):
        N = pop.family.units(pop.settings, pop.width)
        levels = levels_of(N)
        parts = in_basis(pop.family.ipr_parts(pop.tensors), natural_basis(pop.settings), pop.settings.p)
        ranking = _prune_order(neuron_ipr(parts).mean, order, pop.model_ids, seed)
        position = torch.empty_like(ranking)
        position.scatter_(1, ranking, torch.arange(N, device=ranking.device).expand_as(ranking))
        results = []
        for level in levels:
            keep = (position >= level).float()
            results.append(pop.evaluate(tensors=pop.family.prune(pop.tensors, keep)))
            done += len(pop)
            if progress is not None:
                progress(done, total)
        stacked = {k: torch.stack([r[k] for r in results], 1).numpy() for k in METRICS}  # (B, levels)
        for b, m in enumerate(pop.model_ids):
            curves[m] = {"pruned": np.array(levels), "fraction": np.array(levels) / N,
                         **{k: stacked[k][b] for k in METRICS}}
    table = {"model": [], "pruned": [], "fraction": [], **{k: [] for k in METRICS}}
    for m, curve in curves.items():
        table["model"].append(np.full(len(curve["pruned"]), m))
        for k in ("pruned", "fraction", *METRICS):
            table[k].append(curve[k])
    columns = pa.table({k: np.concatenate(v) for k, v in table.items()})
    write_atomic(run / f"prune-{order}.parquet", lambda tmp: pq.write_table(columns, tmp))
    shown = dict(itertools.islice(curves.items(), 9))
    plots.prune_curves(shown, run / f"prune-{order}.png", f"pruning {ORDERS[order]}, no retraining")
    return curves


def phase_axes(grid: dict, x: str | None = None, y: str | None = None) -> tuple[str, str]:
    """The diagram's axes: those given, the rest from the axes the grid varies, xi and alpha first (the paper's
    diagrams), then xi and alpha where fewer than two vary."""
    varying = [a for a in dict.fromkeys(("xi", "alpha", *AXES)) if a != "seed" and len(grid.get(a, ())) > 1]
    choices = [a for a in dict.fromkeys([*varying, "xi", "alpha"]) if a not in (x, y)]  # xi or alpha always left
    x = x if x is not None else choices.pop(0)
    return x, y if y is not None else choices[0]


def _cells(run: Path, x: str | None, y: str | None, column: str | None = None):
    """What a diagram of a models.csv `column` needs: the run's config, its axes (phase_axes), the other axes the
    grid varies, and one panel per combination of those: (its values, its title, {(i, j): the models of cell
    x_j, y_i})."""
    run = Path(run)
    config = read_config(run)
    grid = config["grid"]
    x, y = phase_axes(grid, x, y)
    for name in (x, y):
        if name not in AXES:
            raise ConfigError(f"unknown axis {name!r}; axes are {', '.join(AXES)}")
    if x == y:
        raise ConfigError("--x and --y must be different axes")
    rows = read_models(run)
    if column is not None and rows and column not in rows[0]:  # read_models has checked the training columns
        raise ConfigError(f"models.csv has no {column} column; `fastgrok ipr RUN` adds it")
    others = [a for a in AXES if a not in (x, y, "seed") and len(grid[a]) > 1]
    by_cell: dict[tuple, list] = {}
    for r in rows:
        by_cell.setdefault((*(r[a] for a in others), r[x], r[y]), []).append(r)
    panels = []
    for combo in itertools.product(*(grid[a] for a in others)):
        cells = {}
        for (j, xv), (i, yv) in itertools.product(enumerate(grid[x]), enumerate(grid[y])):
            if (*combo, xv, yv) in by_cell:
                cells[i, j] = by_cell[(*combo, xv, yv)]
        title = ", ".join(f"{a} {axis_text(v)}" for a, v in zip(others, combo)) or f"{len(rows):,} models"
        panels.append((combo, title, cells))
    return config, x, y, others, panels


def phase_diagram(run: Path, x: str | None = None, y: str | None = None) -> list[dict]:
    """Phase of every (x, y) cell, one panel per combination of the other varying axes; seeds aggregated by
    majority, with the fraction agreeing. x, y: grid axes, by default as phase_axes picks them.
    -> phase-Y-vs-X.csv and .png."""
    config, x, y, others, panels = _cells(run, x, y)
    xs, ys = config["grid"][x], config["grid"][y]
    table, drawn = [], []
    for combo, title, cells in panels:
        index = np.full((len(ys), len(xs)), -1)
        agreement = np.ones((len(ys), len(xs)))
        for (i, j), models in cells.items():
            counts = Counter(r.phase for r in models)
            majority = max(counts, key=lambda p: (counts[p], -_rank(p)))
            index[i, j] = _rank(majority)
            agreement[i, j] = counts[majority] / len(models)
            table.append({**dict(zip(others, combo)), x: xs[j], y: ys[i], "phase": majority,
                          "agreement": agreement[i, j], "seeds": len(models)})
        drawn.append((title, index, agreement))
    stem = Path(run) / f"phase-{y}-vs-{x}"
    _write_csv(stem.with_suffix(".csv"), [*others, x, y, "phase", "agreement", "seeds"], table)
    plots.phase_heatmaps(drawn, x, xs, y, ys, stem.with_suffix(".png"), recipe(config))
    return table


# models.csv columns a metric diagram can draw; those in [0, 1] share one colour scale across runs
DIAGRAM_METRICS = ("train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc", "train_loss", "test_loss",
                   "train90_step", "test90_step", "mean_ipr", "high_ipr_fraction", "dead_neurons")
IPR_COLUMNS = ("mean_ipr", "high_ipr_fraction", "dead_neurons")  # added by `fastgrok ipr`
UNIT_METRICS = ("train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc", "mean_ipr", "high_ipr_fraction")


def metric_diagram(run: Path, metric: str, x: str | None = None, y: str | None = None) -> list[dict]:
    """Mean over seeds of a models.csv column in every (x, y) cell, panels as in phase_diagram. Diverged models
    and empty subsets (the corrupted set at xi 0) are left out; a cell with none left is blank.
    -> METRIC-Y-vs-X.csv and .png."""
    if metric not in DIAGRAM_METRICS:
        raise ConfigError(f"unknown --metric {metric!r}; choose one of {', '.join(DIAGRAM_METRICS)}")
    config, x, y, others, panels = _cells(run, x, y, metric)
    xs, ys = config["grid"][x], config["grid"][y]
    no_value = ("never at 90%" if metric.endswith("90_step") else "no corrupted examples"
                if metric in ("corrupted_acc", "inverted_acc") else "no value")
    table, drawn, blank = [], [], set()
    for combo, title, cells in panels:
        mean = np.full((len(ys), len(xs)), np.nan)
        for (i, j), models in cells.items():
            values = [r[metric] for r in models if not r.diverged and r[metric] is not None]
            if values:
                mean[i, j] = np.mean(values)
            else:  # why the cell is blank, for the figure's legend
                blank.add("diverged" if all(r.diverged for r in models) else no_value)
            table.append({**dict(zip(others, combo)), x: xs[j], y: ys[i], metric: mean[i, j],
                          "std": np.std(values) if values else np.nan, "models": len(values)})
        if len(cells) < mean.size:  # a run stopped before these cells' models trained
            blank.add("not trained")
        drawn.append((title, mean))
    stem = Path(run) / f"{metric}-{y}-vs-{x}"
    _write_csv(stem.with_suffix(".csv"), [*others, x, y, metric, "std", "models"], table)
    limits = (0.0, 1.0) if metric in UNIT_METRICS else None
    reasons = [r for r in (no_value, "diverged", "not trained") if r in blank]
    plots.metric_heatmaps(drawn, x, xs, y, ys, metric, limits, stem.with_suffix(".png"), recipe(config),
                          blank=f"blank: {' or '.join(reasons)}" if reasons else None)
    return table


def left_out(metric: str) -> str:
    """The models a metric diagram leaves out of its means, beside the empty subsets (the corrupted set at xi 0)."""
    return "diverged models" + (" and those never at 90%" if metric.endswith("90_step") else "")


@dataclass(frozen=True)
class Diagram:
    """A diagram `fastgrok phase` drew: its axes, its table (one row per cell), its figure, what its means leave
    out (a metric diagram), and notes for the reader (an axis the run did not vary)."""

    x: str
    y: str
    table: list[dict]
    path: Path
    left_out: str
    notes: list[str]


def diagram(run: Path, x: str | None = None, y: str | None = None, metric: str | None = None) -> Diagram:
    """phase_diagram, or metric_diagram of `metric`, over axes x and y (by default as phase_axes picks them)."""
    run = Path(run)
    grid = read_config(run)["grid"]
    x, y = phase_axes(grid, x, y)
    if metric is None:
        table, path, out = phase_diagram(run, x, y), run / f"phase-{y}-vs-{x}.png", ""
    else:
        table, path, out = metric_diagram(run, metric, x, y), run / f"{metric}-{y}-vs-{x}.png", left_out(metric)
    notes = [f"{axis} takes one value in this run ({axis_text(grid[axis][0])}): the diagram is one {line}"
             for axis, line in ((x, "column"), (y, "row")) if len(grid[axis]) == 1]
    return Diagram(x, y, table, path, out, notes)


def generalised_at(rows, level: float = 0.9) -> list[float]:
    """The alphas at which a majority of these models' seeds reached test accuracy `level` (diverged left out)."""
    alphas = sorted({r["alpha"] for r in rows})
    at = {a: [r["test_acc"] for r in rows if r["alpha"] == a and not r.diverged] for a in alphas}
    return [a for a in alphas if at[a] and 2 * sum(v >= level for v in at[a]) > len(at[a])]


def learnability(run: Path, level: float = 0.9) -> list[dict]:
    """Which of the run's tasks (its op axis) a network learned, beside the class the sequel's Hypothesis 5.1
    predicts for it (fastgrok.polynomials.SURVEY; '-' for a task it does not list): each task's mean test accuracy
    at each alpha (over seeds; diverged models left out), whether a majority of its seeds reached `level` at some
    alpha, and the smallest such alpha. -> learnability.csv and learnability.png."""
    from fastgrok.polynomials import SURVEY

    if not 0.0 < level <= 1.0:
        raise ConfigError(f"--level must be in (0, 1], got {level:g}")
    run = Path(run)
    config = read_config(run)
    settings, grid = settings_of(config), config["grid"]
    ops = grid["op"] if grid["op"] != [None] else [settings.op]
    rows, alphas = read_models(run), grid["alpha"]
    table = []
    for op in ops:
        mine = [r for r in rows if (r["op"] or settings.op) == op and not r.diverged]
        at = {a: [r["test_acc"] for r in mine if r["alpha"] == a] for a in alphas}
        learned = generalised_at(mine, level)
        predicted, why = SURVEY.get(op, ("-", ""))
        table.append({"op": op, "predicted": predicted, "generalises": bool(learned),
                      "from_alpha": min(learned) if learned else None, "why": why,
                      **{f"test_acc_alpha_{axis_text(a)}": float(np.mean(v)) if v else None for a, v in at.items()}})
    columns = ["op", "predicted", "generalises", "from_alpha", *(f"test_acc_alpha_{axis_text(a)}" for a in alphas), "why"]
    _write_csv(run / "learnability.csv", columns, table)
    mean = np.array([[np.nan if r[f"test_acc_alpha_{axis_text(a)}"] is None else r[f"test_acc_alpha_{axis_text(a)}"]
                      for a in alphas] for r in table])
    labels = [f"{r['op']}  ({r['predicted']})" if r["predicted"] != "-" else r["op"] for r in table]
    plots.learnability(labels, alphas, mean, run / "learnability.png", recipe(config))
    return table


def _write_csv(path: Path, columns: list[str], table: list[dict]) -> None:
    write_csv(path, [columns, *([csv_cell(r.get(c, ""), c) for c in columns] for r in table)])


def _rank(phase: str) -> int:
    names = [*PHASES, "diverged"]
    return names.index(phase)


def curves(run: Path, models: str | None = None) -> list[Path]:
    """Training curves. Model ids: one figure per model (curves-modelM.png); a phase name, or "all" for every
    phase: one figure per phase with the mean over its models and the band of their 10th to 90th percentiles
    (curves-PHASE.png); default: one figure for the first model of each phase."""
    run = Path(run)
    rows = read_models(run)
    logged = read_history(run)
    history = {name: logged.column(name).to_numpy() for name in logged.column_names}
    steps = np.unique(history["step"])

    def curve(m: int) -> dict[str, np.ndarray]:  # one model's history on the run's logged steps (NaN: not reached)
        sel = history["model"] == m
        at = np.searchsorted(steps, history["step"][sel])
        out = {k: np.full(len(steps), np.nan) for k in history if k not in ("model", "step")}
        for k in out:
            out[k][at] = history[k][sel]
        return {"step": steps, **out}

    if models is not None and (models == "all" or models in (*PHASES, "diverged")):
        groups: dict[str, list[int]] = {}
        for r in rows:
            if models in ("all", r.phase):
                groups.setdefault(r.phase, []).append(r.model)
        if not groups:
            raise ConfigError(f"no model of this run is in phase {models!r}")
        paths, how = [], recipe(read_config(run))
        for phase, ids in sorted(groups.items(), key=lambda g: _rank(g[0])):
            per_model = [curve(m) for m in ids]
            stacked = {k: np.stack([c[k] for c in per_model]) for k in per_model[0] if k != "step"}
            with warnings.catch_warnings():  # a step no model reached (or an empty subset) is NaN, and stays so
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = {k: np.nanmean(v, axis=0) for k, v in stacked.items()}
                band = {k: np.nanquantile(v, (0.1, 0.9), axis=0) for k, v in stacked.items()}
            title = f"{phase}: mean of {len(ids):,} {plural('model', len(ids))}, band 10th-90th percentile; {how}"
            paths.append(plots.training_curves({"step": steps, **mean}, run / f"curves-{phase}.png", title, band))
        return paths
    chosen = select_models(rows, models)
    if chosen is None:
        seen: dict[str, int] = {}
        for r in rows:
            seen.setdefault(r.phase, r.model)
        chosen = list(seen.values())
    paths = []
    for m in chosen:
        row = next(r for r in rows if r.model == m)
        axes = ", ".join(f"{a} {axis_text(row[a])}" for a in AXES if row[a] is not None)
        paths.append(plots.training_curves(curve(m), run / f"curves-model{m}.png", f"model {m}: {axes} -> {row['phase']}"))
    return paths
