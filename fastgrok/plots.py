"""Figures written into run directories (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from fastgrok.config import axis_text  # noqa: E402
from fastgrok.phases import PHASES  # noqa: E402

PHASE_COLORS = {
    "coexistence": "#2ca02c",
    "partial_inversion": "#9ecae1",
    "full_inversion": "#1f77b4",
    "memorization": "#ff7f0e",
    "forgetting": "#9e9e9e",
    "diverged": "#000000",
}
ACCURACIES = {"train_acc": "train", "test_acc": "test", "clean_acc": "clean", "corrupted_acc": "corrupted (memorized)",
              "inverted_acc": "corrupted vs true (inverted)"}
ACCURACY_COLORS = {key: f"C{i}" for i, key in enumerate(ACCURACIES)}  # one colour per metric in every panel


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(n: int, width: float, height: float, per_row: int = 3):
    """A figure of n panels of width x height inches, `per_row` to a row, the spare ones blank."""
    cols = min(n, per_row)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def ipr_histograms(groups: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """One panel per group (a model or a phase) of the neuron IPR distribution."""
    fig, axes = _panels(len(groups), 4, 3)
    bins = np.linspace(0, 1, 41)
    for ax, (label, values) in zip(axes.flat, groups.items()):
        ax.hist(values, bins=bins, color=PHASE_COLORS.get(label, "#555555"))
        ax.set_title(f"{label} ({len(values):,} neurons)", fontsize=9)
        ax.set_xlabel("neuron IPR")
        ax.set_ylabel("neurons")
    fig.suptitle(title)
    return _save(fig, path)


def neuron_spectra(panels: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """One panel per model: its live neurons' power fractions (neurons x frequencies), sorted by IPR, highest
    first. A periodic neuron is one bright cell; a memorizing one a smeared row."""
    rows = max(len(power) for power in panels.values())
    fig, axes = _panels(len(panels), 4, min(max(3.4, rows / 100), 7))  # about a pixel a neuron up to N 700
    for ax, (label, power) in zip(axes.flat, panels.items()):
        # antialiased: where neurons outnumber pixels, a row is averaged in, never dropped as "nearest" would
        image = ax.imshow(power, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="antialiased")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("frequency k")
        ax.set_ylabel(f"neuron, by IPR ({len(power):,})")
    fig.colorbar(image, ax=axes, label="share of the neuron's power", shrink=0.9)
    fig.suptitle(title)
    return _save(fig, path)


def ipr_vs_bn(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """A panel per model: each neuron's |BatchNorm weight| against its IPR."""
    fig, axes = _panels(len(panels), 3.6, 3.0)
    for ax, (label, (ipr, gamma)) in zip(axes.flat, panels.items()):
        ax.scatter(ipr, gamma, s=6, alpha=0.6)
        ax.set_xlim(0, 1)
        ax.set_xlabel("neuron IPR")
        ax.set_ylabel("|BatchNorm weight|")
        ax.set_title(label, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def prune_curves(curves: dict[int, dict[str, np.ndarray]], path: Path, title: str) -> Path:
    """One panel per model: accuracies against the fraction of neurons pruned; one legend below for every metric
    a panel shows (a clean model's has no corrupted subset)."""
    fig, axes = _panels(len(curves), 4.5, 3.2)
    drawn = set()
    for ax, (model, curve) in zip(axes.flat, curves.items()):
        for key in ACCURACIES:
            if np.isfinite(curve[key]).any():
                ax.plot(curve["fraction"], curve[key], color=ACCURACY_COLORS[key])
                drawn.add(key)
        ax.set_title(f"model {model}", fontsize=9)
        ax.set_xlabel("fraction of neurons pruned")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
    handles = [Line2D([], [], color=ACCURACY_COLORS[key], label=label) for key, label in ACCURACIES.items() if key in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _heatmap_panels(titles: list[str], x_name: str, x_values, y_name: str, y_values, title: str | None):
    """A figure of labelled heatmap axes, four to a row; returns it and one axis per title."""
    fig, axes = _panels(len(titles), 3.6, 3.3, per_row=4)
    for ax, panel_title in zip(axes.flat, titles):
        ax.set_title(panel_title, fontsize=9)
        _ticks(ax.set_xticks, ax.set_xticklabels, x_values)
        _ticks(ax.set_yticks, ax.set_yticklabels, y_values)
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, list(axes.flat)[:len(titles)]


def _blank_cell(label: str) -> Patch:
    """A legend entry for a heatmap's blank (masked) cells."""
    return Patch(facecolor="white", edgecolor="black", linewidth=0.5, label=label)


def phase_heatmaps(panels: list[tuple[str, np.ndarray, np.ndarray]], x_name: str, x_values, y_name: str, y_values,
                   path: Path, title: str | None = None) -> Path:
    """panels: (title, phase index grid (len(y), len(x)) with -1 for missing, agreement grid in [0, 1]);
    title: the whole figure's (the run's recipe)."""
    names = [*PHASES, "diverged"]
    cmap = ListedColormap([PHASE_COLORS[p] for p in names])
    fig, axes = _heatmap_panels([t for t, _, _ in panels], x_name, x_values, y_name, y_values, title)
    for ax, (_, grid, agreement) in zip(axes, panels):
        shown = np.ma.masked_less(grid, 0)
        ax.imshow(shown, origin="lower", aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        for (i, j), a in np.ndenumerate(agreement):
            if grid[i, j] >= 0 and a < 1:
                ax.text(j, i, "x", ha="center", va="center", fontsize=7, color="white")  # seeds disagree
    # the five phases always; diverged, blank cells and the seeds' "x" only where a panel shows them
    drawn = [p for k, p in enumerate(names) if k < len(PHASES) or any((g == k).any() for _, g, _ in panels)]
    handles = [Patch(color=PHASE_COLORS[p], label=p) for p in drawn]  # as models.csv and --models write them
    if any((g < 0).any() for _, g, _ in panels):  # an interrupted run's models that never started
        handles.append(_blank_cell(label="not trained"))
    if any(((g >= 0) & (a < 1)).any() for _, g, a in panels):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none",
                              label="seeds disagree (majority shown)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    return _save(fig, path)


def metric_heatmaps(panels: list[tuple[str, np.ndarray]], x_name: str, x_values, y_name: str, y_values, metric: str,
                    limits: tuple[float, float] | None, path: Path, title: str | None = None,
                    blank: str | None = None) -> Path:
    """panels: (title, values (len(y), len(x)), NaN where blank); one colour scale for every panel: `limits`, or
    the values' range; `blank`: the legend of the blank cells (why they have no value)."""
    finite = np.concatenate([v.ravel() for _, v in panels])
    finite = finite[np.isfinite(finite)]
    vmin, vmax = limits if limits is not None else (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    fig, axes = _heatmap_panels([t for t, _ in panels], x_name, x_values, y_name, y_values, title)
    for ax, (_, grid) in zip(axes, panels):
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis", vmin=vmin,
                          vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=axes, label=f"{metric} (mean over seeds)", shrink=0.9)
    if blank is not None:
        fig.legend(handles=[_blank_cell(label=blank)],
                   loc="outside lower center", fontsize=8)
    return _save(fig, path)


def _ticks(set_ticks, set_labels, values) -> None:
    step = 1 if any(isinstance(v, str) for v in values) else max(1, len(values) // 6)  # every task named
    idx = list(range(0, len(values), step))
    set_ticks(idx)
    set_labels([axis_text(values[i]) for i in idx], fontsize=7)


def learnability(labels: list[str], alphas: list[float], mean: np.ndarray, path: Path, title: str) -> Path:
    """Mean test accuracy (len(labels), len(alphas)) of each task at each training fraction, the value in each cell;
    a task's label says the class predicted for it."""
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(alphas), 1.0 + 0.32 * len(labels)), layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(mean), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    for (i, j), value in np.ndenumerate(mean):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(alphas)), [axis_text(a) for a in alphas], fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("alpha (training fraction)")
    fig.colorbar(image, ax=ax, label="test accuracy (mean over seeds)", shrink=0.8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def training_curves(history: dict[str, np.ndarray], path: Path, title: str,
                    band: dict[str, np.ndarray] | None = None) -> Path:
    """Accuracies, losses and mean IPR against the training step: one model's, or with `band` ((2, steps) per
    key: lower and upper curves) a group's mean with a shaded band."""
    fig, (acc, loss, ipr) = plt.subplots(1, 3, figsize=(14, 3.4), layout="constrained", sharex=True)
    step = history["step"]

    def draw(ax, key, **kwargs):
        (line,) = ax.plot(step, history[key], **kwargs)
        if band is not None:
            ax.fill_between(step, band[key][0], band[key][1], color=line.get_color(), alpha=0.2, linewidth=0)

    for key, label in ACCURACIES.items():
        if np.isfinite(history[key]).any():
            draw(acc, key, label=label, color=ACCURACY_COLORS[key])
    acc.set_ylim(-0.02, 1.02)
    acc.set_ylabel("accuracy")
    acc.legend(fontsize=7)
    for key in ("train_loss", "test_loss"):  # a diverged model's loss ends in inf, which a log axis leaves out
        label, bad = key.removesuffix("_loss"), ~np.isfinite(history[key])
        if bad.any():  # with markers: the finite points before may be too few for a line
            draw(loss, key, label=f"{label} (not finite from step {step[bad.argmax()]:g})", marker="o", markersize=3)
        else:
            draw(loss, key, label=label)
    loss.set_yscale("log")
    _log_ticks(loss.yaxis)
    loss.set_ylabel("loss")
    loss.legend(fontsize=7)
    draw(ipr, "ipr", color="purple")
    ipr.set_ylabel("mean neuron IPR")
    for ax in (acc, loss, ipr):
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10 if band is not None else None)
    return _save(fig, path)


def accuracy_vs_width(curves: dict[str, tuple[list, list]], path: Path, title: str) -> Path:
    """Accuracy on all inputs against the width, a line per label (label -> (widths, accuracies)); a log width
    axis where the widths span two decades or more."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, (widths, accuracies) in curves.items():
        ax.plot(widths, accuracies, marker="o", label=label or None)
    widths = [w for ws, _ in curves.values() for w in ws]
    if max(widths) >= 100 * min(widths):
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, counts=True)
    ax.set_xlabel("width N")
    ax.set_ylabel("accuracy on all inputs")
    ax.set_ylim(-0.02, 1.02)
    if len(curves) > 1:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return _save(fig, path)


def _number(value: float, _position=None) -> str:
    """A tick label: 0.0195, 5, 466, 7.1k, 37k, 100k, 1.2M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            value /= scale
            return f"{value:.0f}{suffix}" if value >= 10 else f"{value:.2g}{suffix}"
    return f"{value:.3g}"


def _log_ticks(axis, counts: bool = False) -> None:
    """A log axis (its data drawn) that reads as numbers. Spanning less than two decades it is ticked at 1, 2 and
    5 times the powers of ten, or evenly where fewer than two of those fall in it, and labelled 0.0195 or 200:
    matplotlib's default labels a decade or less with no tick, or with '2x10^-2'. `counts` labels it 1k, not 10^3,
    however wide."""
    low, high = axis.get_view_interval()
    narrow = high < 100 * low
    if narrow:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    if narrow or counts:
        axis.set_major_formatter(FuncFormatter(_number))
        axis.set_minor_formatter(NullFormatter())


def bench_throughput(report: dict, path: Path, targets: dict[tuple[str, int], float] | None = None) -> Path:
    """A `fastgrok bench` report: one panel per width, model-steps/s against the population size B (log-log), a
    line per backend variant, the reference.py loop (one model at a time) dashed; `targets` ((variant, width) ->
    model-steps/s) dotted in the variant's colour."""
    results = [r for r in report["results"] if r["model_steps_per_s"] > 0]
    widths = sorted({r["width"] for r in results})
    variants = list(dict.fromkeys(r["backend"] for r in results if r["backend"] != "reference"))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, axes = _panels(max(1, len(widths)), 4.6, 3.6)
    for ax, width in zip(axes.flat, widths):
        rows = [r for r in results if r["width"] == width]
        for v in variants:
            points = sorted((r["models"], r["model_steps_per_s"]) for r in rows if r["backend"] == v)
            if points:
                ax.plot(*zip(*points), "o-", color=colors[v], label=v, markersize=4)
        for r in rows:
            if r["backend"] == "reference":
                ax.axhline(r["model_steps_per_s"], color="black", linestyle="--", linewidth=1, label="reference.py loop")
        for (v, w), value in (targets or {}).items():
            if w == width:
                ax.axhline(value, color=colors.get(v, "black"), linestyle=":", linewidth=1.5, label=f"{v} target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax.xaxis, counts=True)
        _log_ticks(ax.yaxis, counts=True)
        ax.set_title(f"N {width}", fontsize=10)
        ax.set_xlabel("models in the population (B)")
        ax.set_ylabel("model-steps/s")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    s = report["setting"]
    fig.suptitle(f"{report['device']}, p {s['p']}, alpha {s['alpha']}, {s['loss']}, {s['optimizer']}, "
                 f"full batch ({report['date']})", fontsize=10)
    return _save(fig, path)
