"""`fastgrok reproduce`: the experiments of "To grok or not to grok" (Doshi, Das, He, Gromov, ICLR 2024) and of
"Grokking modular polynomials" (Doshi, He, Das, Gromov 2024) as ordinary runs in one folder, and a report that
checks each claim of the papers against them.

EXPERIMENTS says what each experiment trains, at the papers' size and at a reduced one (--quick, for a CPU);
CLAIMS is the table of claims: each one's statement with where the paper makes it (a section, figure or table), the experiment it reads, and the
criterion that decides whether it holds there, a function of the run's models.csv rows that returns the verdict
and the numbers behind it. Every experiment is a run directory DIR/<name>: a second call skips the complete ones
and resumes an interrupted one.
"""

from __future__ import annotations

import base64
import datetime
import html
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastgrok.errors import ConfigError

TO_GROK = "To grok or not to grok (Doshi, Das, He, Gromov, ICLR 2024)"
POLYNOMIALS = "Grokking modular polynomials (Doshi, He, Das, Gromov 2024)"


@dataclass(frozen=True)
class Experiment:
    """A run: `train` grid axes and settings (as the command line spells them) at the papers' size and at --quick's,
    or an `analytic` solution's widths; then the analysis commands that draw its figure."""

    about: str
    full: dict
    quick: dict
    kind: str = "train"  # or "analytic"
    figure: str = ""  # the analysis that draws it: phase, learnability, accuracy (analytic)


EXPERIMENTS = {
    "wd-xi": Experiment(
        "phases over corruption xi and weight decay, alpha 0.5 (the paper's xi x weight decay panel)",
        full={"axes": {"xi": "0:0.6:13", "wd": "0,5,15"}, "settings": {}},
        quick={"axes": {"xi": "0:0.6:13", "wd": "0,5,15", "width": "128"}, "settings": {"p": 47}},
        figure="phase"),
    "analytic-width": Experiment(
        "the analytic solution of addition against the width (Gromov 2023, as the paper uses it)",
        full={"p": 97, "widths": "10,20,50,100,150,200,300,500"},
        quick={"p": 97, "widths": "10,20,50,100,150,200,300,500"},
        kind="analytic", figure="accuracy"),
    "learnability": Experiment(
        "which polynomials a network learns: 9 of the form h(g1(x)+g2(y)), 5 not (the sequel's Section 5)",
        full={"preset": "polynomials"},
        quick={"preset": "polynomials-cpu"},
        figure="learnability"),
}


def _by(rows, **where):
    return [r for r in rows if all((r[k] == v) if not callable(v) else v(r[k]) for k, v in where.items())]


def _share(rows, phases: tuple[str, ...]) -> float:
    return sum(r.phase in phases for r in rows) / max(1, len(rows))


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: its statement, where the paper makes it, the experiment that tests it, and the
    criterion: rows (the experiment's models.csv) -> (holds, the numbers behind the verdict). `criterion_text`
    states the criterion as the report prints it."""

    paper: str
    where: str
    statement: str
    experiment: str
    criterion_text: str
    criterion: Callable[[list], tuple[bool, str]] = field(repr=False)


def _coexistence_without_noise(rows):
    clean = _by(rows, xi=0.0, wd=lambda w: w <= 5)
    share = _share(clean, ("coexistence",))
    return bool(clean) and share == 1.0, f"{share:.0%} of the xi 0, wd <= 5 models generalise ({len(clean)} models)"


def _memorization_without_regularisation(rows):
    noisy = _by(rows, wd=0.0, xi=lambda x: x >= 0.3)
    share = _share(noisy, ("memorization",))
    return share >= 0.8, f"{share:.0%} of the wd 0, xi >= 0.3 models memorise ({len(noisy)} models)"


def _inversion_with_weight_decay(rows):
    mid = _by(rows, wd=5.0, xi=lambda x: 0.15 <= x <= 0.3)
    share = _share(mid, ("partial_inversion", "full_inversion"))
    return share >= 0.8, f"{share:.0%} of the wd 5, xi 0.15-0.3 models invert ({len(mid)} models)"


def _forgetting_with_strong_weight_decay(rows):
    strong = _by(rows, wd=15.0)
    share = _share(strong, ("forgetting",))
    phases = ", ".join(f"{p} {n}" for p, n in Counter(r.phase for r in strong).most_common())
    return share >= 0.8, f"{share:.0%} of the wd 15 models forget ({phases})"


def _analytic_exact_when_wide(rows):
    by_width = sorted((r["width"], r["test_acc"]) for r in rows)
    wide, narrow = by_width[-1], by_width[0]
    return wide[1] == 1.0 and narrow[1] < 0.9, (f"test accuracy {wide[1]:.3f} at N {wide[0]}, {narrow[1]:.3f} at N "
                                                f"{narrow[0]}")


def _learnable_iff_sum_form(rows):
    from fastgrok.analysis import generalised_at
    from fastgrok.polynomials import SURVEY

    listed = {op: predicted for op, (predicted, _) in SURVEY.items() if any(r["op"] == op for r in rows)}
    wrong = [op for op, predicted in listed.items()
             if bool(generalised_at([r for r in rows if r["op"] == op])) != (predicted == "learnable")]
    return bool(listed) and not wrong, (f"{len(listed) - len(wrong)} of {len(listed)} polynomials as predicted"
                                        + (f" (not: {', '.join(wrong)})" if wrong else ""))


CLAIMS = [
    Claim(TO_GROK, "Sec. Grokking with label noise", "Without label noise the network fits its training set and generalises "
          "(coexistence), with weight decay or without.", "wd-xi", "every model at xi 0 and wd <= 5 is in "
          "coexistence", _coexistence_without_noise),
    Claim(TO_GROK, "Sec. Grokking with label noise", "Without regularisation a network trained on enough corrupted labels "
          "memorises them and does not generalise (memorization).", "wd-xi",
          "80% or more of the models at wd 0 and xi >= 0.3 are in memorization", _memorization_without_regularisation),
    Claim(TO_GROK, "Sec. Effect of regularization", "Weight decay makes the network invert the corrupted labels: it learns their "
          "true value (partial or full inversion).", "wd-xi",
          "80% or more of the models at wd 5 and xi 0.15-0.3 are in partial or full inversion",
          _inversion_with_weight_decay),
    Claim(TO_GROK, "Sec. Effect of regularization", "Too much weight decay makes the network forget the training set "
          "(forgetting).", "wd-xi", "80% or more of the models at wd 15 are in forgetting",
          _forgetting_with_strong_weight_decay),
    Claim(TO_GROK, "its analytic solution (Gromov 2023)", "The analytic solution of modular addition is exact once the network is "
          "wide enough.", "analytic-width", "test accuracy 1 at the largest width, below 0.9 at the smallest",
          _analytic_exact_when_wide),
    Claim(POLYNOMIALS, "Hypothesis 5.1, App. C", "A network generalises on a polynomial exactly when it has the form "
          "h(g1(x) + g2(y)).", "learnability",
          "a polynomial has a majority of seeds at test accuracy 0.9 at some alpha exactly when it is predicted "
          "learnable (`fastgrok learnability`)", _learnable_iff_sum_form),
]


def _selected(only: str | None) -> list[str]:
    if only is None:
        return list(EXPERIMENTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise ConfigError(f"unknown experiment {unknown[0] if unknown else only!r}; choose from "
                          f"{', '.join(EXPERIMENTS)}")
    return names


def _grid(spec: dict, device: str):
    """The grid and settings of a train experiment's spec."""
    from fastgrok import presets
    from fastgrok.config import AXES, Grid, Settings

    if "preset" in spec:
        request = presets.resolve(spec["preset"], dict.fromkeys(AXES), {}, device)
        return request.grid, request.settings
    return Grid.parse(spec["axes"]), Settings(**spec["settings"])


def planned_steps(names: list[str], out: Path, quick: bool, device: str = "auto") -> int:
    """The model-steps the experiments not yet complete in `out` train (an interrupted one counted whole)."""
    from fastgrok.results import read_config

    total = 0
    for name in names:
        exp, run = EXPERIMENTS[name], out / name
        if exp.kind == "analytic" or ((run / "config.json").exists() and read_config(run)["status"] == "complete"):
            continue
        grid, settings = _grid(exp.quick if quick else exp.full, device)
        total += len(grid) * settings.steps
    return total


def run_experiment(name: str, out: Path, quick: bool, device: str = "auto",
                   on_step: Callable[[int, int], None] | None = None) -> str:
    """Train (or resume, or skip when complete) one experiment's run at DIR/name, then draw its figure; returns
    what was done: 'trained', 'resumed' or 'kept'. on_step: as train's."""
    from fastgrok import analysis
    from fastgrok import train as training
    from fastgrok.results import read_config

    exp, run = EXPERIMENTS[name], out / name
    spec = exp.quick if quick else exp.full
    done = "kept"
    if exp.kind == "analytic":
        if not (run / "config.json").exists():
            from fastgrok.analytic import analytic_run

            analytic_run(run, p=spec["p"], widths=spec["widths"], device="cpu" if device == "auto" else device)
            done = "trained"
    elif not (run / "config.json").exists():
        grid, settings = _grid(spec, device)
        training.train(grid, settings, run, device=device, on_step=on_step)
        done = "trained"
    elif read_config(run)["status"] != "complete":
        training.resume(run, device=device, on_step=on_step)
        done = "resumed"
    if exp.figure == "phase":
        analysis.phase_diagram(run)
    elif exp.figure == "learnability":
        analysis.learnability(run)
    return done


def verdicts(out: Path, names: list[str]) -> list[dict]:
    """Each claim whose experiment is among `names` and complete in `out`: its verdict and numbers."""
    from fastgrok.results import read_config, read_models

    table = []
    for claim in CLAIMS:
        if claim.experiment not in names:
            continue
        run = out / claim.experiment
        if not (run / "config.json").exists() or read_config(run)["status"] != "complete":
            table.append({"claim": claim, "verdict": "not run", "numbers": "the experiment has not finished"})
            continue
        holds, numbers = claim.criterion(read_models(run))
        table.append({"claim": claim, "verdict": "holds" if holds else "differs", "numbers": numbers})
    return table


FIGURES = {"phase": "phase-*-vs-*.png", "learnability": "learnability.png", "accuracy": "accuracy-vs-width.png"}


def write_report(out: Path, names: list[str], quick: bool) -> tuple[Path, Path]:
    """DIR/report.md (figures linked) and DIR/report.html (figures inlined): per claim the statement with its
    source, the criterion, the verdict with its numbers, and the experiment's figure."""
    table = verdicts(out, names)
    size = "--quick (reduced sizes, on a CPU)" if quick else "the papers' sizes"
    lines = [f"# fastgrok reproduce: {datetime.date.today().isoformat()}, {size}", "",
             f"{sum(t['verdict'] == 'holds' for t in table)} of {len(table)} claims hold.", "",
             "| paper | where | claim | criterion | verdict | numbers |", "| --- | --- | --- | --- | --- | --- |"]
    for t in table:
        c = t["claim"]
        lines.append(f"| {c.paper.split(' (')[0]} | {c.where} | {c.statement} | {c.criterion_text} | "
                     f"**{t['verdict']}** | {t['numbers']} |")
    lines.append("")
    for name in names:
        exp = EXPERIMENTS[name]
        lines += [f"## {name}", "", exp.about, ""]
        for figure in sorted((out / name).glob(FIGURES.get(exp.figure, "-"))):
            lines += [f"![{name}]({name}/{figure.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    page = out / "report.html"
    page.write_text(_html(lines, out))
    return md, page


def _html(lines: list[str], out: Path) -> str:
    """The markdown report as one self-contained page: its table as a table, its figures inlined."""
    body = []
    for line in lines:
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("| ---"):
            continue
        elif line.startswith("|"):
            cells = [html.escape(c.strip()).replace("**", "") for c in line.strip("|").split("|")]
            tag = "th" if line.startswith("| paper") else "td"
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        elif (image := re.match(r"!\[(.*)\]\((.*)\)", line)) is not None:
            data = base64.b64encode((out / image.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    text = "\n".join(body)
    text = re.sub(r"(<tr>.*?</tr>\n?)+", lambda m: f"<table border=1>{m.group(0)}</table>", text, flags=re.S)
    return ("<!doctype html><meta charset=utf-8><title>fastgrok reproduce</title>"
            "<style>body{font-family:sans-serif;max-width:70em}td,th{padding:4px;vertical-align:top}</style>\n" + text)


def reproduce(out: str | Path = "reproduce", quick: bool = False, only: str | None = None, device: str = "auto",
              on_experiment: Callable[[str, str], None] | None = None,
              on_step: Callable[[int, int], None] | None = None) -> tuple[Path, Path]:
    """Run (or resume) every selected experiment in `out`, one after another, then write the report. Ctrl-C keeps
    the finished experiments and writes the report of what has finished before raising."""
    names, out = _selected(only), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            done = run_experiment(name, out, quick, device, on_step)
            if on_experiment is not None:
                on_experiment(name, done)
    finally:
        report = write_report(out, names, quick)
    return report
