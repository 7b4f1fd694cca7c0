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
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastgrok import __version__
from fastgrok.errors import ConfigError

TO_GROK = "To grok or not to grok (Doshi, Das, He, Gromov, ICLR 2024)"
POLYNOMIALS = "Grokking modular polynomials (Doshi, He, Das, Gromov 2024)"


@dataclass(frozen=True)
class Experiment:
    """A run: `train` grid axes and settings (as the command line spells them) at the papers' size and at --quick's,
    or an `analytic` solution's widths; then the analyses its claims read (ANALYSES)."""

    about: str
    full: dict
    quick: dict
    kind: str = "train"  # or "analytic"
    analyses: tuple[str, ...] = ()


# what each analysis writes into the run (the report shows its figure), and how it is run
ANALYSES = {
    "phase": ("phase-*-vs-*.png", lambda analysis, run: analysis.phase_diagram(run)),
    "ipr": ("ipr-hist.png", lambda analysis, run: analysis.ipr(run)),
    "prune": ("prune-low.png", lambda analysis, run: analysis.prune(run, order="low", models="coexistence")),
    "learnability": ("learnability.png", lambda analysis, run: analysis.learnability(run)),
    "accuracy": ("accuracy-vs-width.png", None),  # drawn by `analytic` itself
}


EXPERIMENTS = {
    "wd-xi": Experiment(
        "phases over corruption xi and weight decay, alpha 0.5 (the paper's xi x weight decay panel), with the "
        "IPR of every model's neurons and its coexistence models pruned low-IPR first",
        full={"axes": {"xi": "0:0.6:13", "wd": "0,5,15"}, "settings": {}},
        quick={"axes": {"xi": "0:0.6:13", "wd": "0,5,15", "width": "128"}, "settings": {"p": 47}},
        analyses=("phase", "ipr", "prune")),
    "analytic-width": Experiment(
        "the analytic solution of addition against the width (Gromov 2023, as the paper uses it)",
        full={"p": 97, "widths": "10,20,50,100,150,200,300,500"},
        quick={"p": 97, "widths": "10,20,50,100,150,200,300,500"},
        kind="analytic", analyses=("accuracy",)),
    "transformer": Experiment(
        "the encoder-only transformer (the paper's Fig. 7a): clean and corrupted data, without and with weight "
        "decay",
        full={"axes": {"xi": "0,0.15", "wd": "0,5", "alpha": "0.5", "width": "128", "lr": "0.001"},
              "settings": {"model": "transformer", "steps": 3000}},
        quick={"axes": {"xi": "0,0.15", "wd": "0,5", "alpha": "0.9", "width": "64", "lr": "0.005"},
               "settings": {"model": "transformer", "p": 23, "steps": 1500}},
        analyses=("phase",)),
    "deep-mlp": Experiment(
        "the deeper ReLU MLP (the paper's Fig. 7b): clean and corrupted data, without and with weight decay",
        full={"axes": {"xi": "0,0.2", "wd": "0,15", "alpha": "0.5", "width": "500"},
              "settings": {"model": "deep-mlp", "depth": 3}},
        quick={"axes": {"xi": "0,0.2", "wd": "0,15", "alpha": "0.6", "width": "256", "lr": "0.003"},
               "settings": {"model": "deep-mlp", "depth": 2, "p": 41, "steps": 3000}},
        analyses=("phase",)),
    "mul": Experiment(
        "multiplication trained (the sequel's Fig. 3: p 97, N 500, alpha 0.5, lr 0.005, wd 5), its neurons' IPR in "
        "the discrete-log basis",
        full={"axes": {"xi": "0", "wd": "5", "lr": "0.005"}, "settings": {"op": "mul"}},
        quick={"axes": {"xi": "0", "wd": "5", "lr": "0.005", "width": "256"}, "settings": {"op": "mul", "p": 23}},
        analyses=("ipr",)),
    "sum4": Experiment(
        "x1+x2+x3+x4 trained (the sequel's Fig. 2: p 11, N 5000, alpha 0.5, lr 0.005, wd 5), phi = x^4",
        full={"axes": {"xi": "0", "wd": "5", "lr": "0.005", "width": "5000"},
              "settings": {"terms": 4, "act": "pow", "p": 11}},
        quick={"axes": {"xi": "0", "wd": "5", "lr": "0.005", "width": "512"},
               "settings": {"terms": 4, "act": "pow", "p": 11, "steps": 2000, "log_every": 250}},
        analyses=("ipr",)),
    "learnability": Experiment(
        "which polynomials a network learns: 9 of the form h(g1(x)+g2(y)), 5 not (the sequel's Section 5)",
        full={"preset": "polynomials"},
        quick={"preset": "polynomials-cpu"},
        analyses=("learnability",)),
}


def _by(rows, **where):
    return [r for r in rows if all((r[k] == v) if not callable(v) else v(r[k]) for k, v in where.items())]


def _share(rows, phases: tuple[str, ...]) -> float:
    return sum(r.phase in phases for r in rows) / max(1, len(rows))


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: its statement, where the paper makes it, the experiment that tests it, and the
    criterion: (rows, run) -> (holds, the numbers behind the verdict), from the experiment's models.csv rows and,
    for what they do not hold (pruning curves), its run directory. `criterion_text` states the criterion as the
    report prints it."""

    paper: str
    where: str
    statement: str
    experiment: str
    criterion_text: str
    criterion: Callable[[list, Path | None], tuple[bool, str]] = field(repr=False)


def _coexistence_without_noise(rows, run=None):
    clean = _by(rows, xi=0.0, wd=lambda w: w <= 5)
    share = _share(clean, ("coexistence",))
    return bool(clean) and share == 1.0, f"{share:.0%} of the xi 0, wd <= 5 models generalise ({len(clean)} models)"


def _memorization_without_regularisation(rows, run=None):
    noisy = _by(rows, wd=0.0, xi=lambda x: x >= 0.3)
    share = _share(noisy, ("memorization",))
    return share >= 0.8, f"{share:.0%} of the wd 0, xi >= 0.3 models memorise ({len(noisy)} models)"


def _inversion_with_weight_decay(rows, run=None):
    mid = _by(rows, wd=5.0, xi=lambda x: 0.15 <= x <= 0.3)
    share = _share(mid, ("partial_inversion", "full_inversion"))
    return share >= 0.8, f"{share:.0%} of the wd 5, xi 0.15-0.3 models invert ({len(mid)} models)"


def _forgetting_with_strong_weight_decay(rows, run=None):
    strong = _by(rows, wd=15.0)
    share = _share(strong, ("forgetting",))
    phases = ", ".join(f"{p} {n}" for p, n in Counter(r.phase for r in strong).most_common())
    return share >= 0.8, f"{share:.0%} of the wd 15 models forget ({phases})"


def _analytic_exact_when_wide(rows, run=None):
    by_width = sorted((r["width"], r["test_acc"]) for r in rows)
    wide, narrow = by_width[-1], by_width[0]
    return wide[1] == 1.0 and narrow[1] < 0.9, (f"test accuracy {wide[1]:.3f} at N {wide[0]}, {narrow[1]:.3f} at N "
                                                f"{narrow[0]}")


def _learnable_iff_sum_form(rows, run=None):
    from fastgrok.analysis import generalised_at
    from fastgrok.polynomials import SURVEY

    listed = {op: predicted for op, (predicted, _) in SURVEY.items() if any(r["op"] == op for r in rows)}
    wrong = [op for op, predicted in listed.items()
             if bool(generalised_at([r for r in rows if r["op"] == op])) != (predicted == "learnable")]
    return bool(listed) and not wrong, (f"{len(listed) - len(wrong)} of {len(listed)} polynomials as predicted"
                                        + (f" (not: {', '.join(wrong)})" if wrong else ""))


GENERALISING = ("coexistence", "partial_inversion", "full_inversion")


def _ipr_separates_the_phases(rows, run=None):
    high = [r["mean_ipr"] for r in rows if r.phase in GENERALISING]
    low = [r["mean_ipr"] for r in rows if r.phase == "memorization"]
    if not high or not low:
        return False, f"{len(high)} generalising and {len(low)} memorising models: both are needed"
    gap = sum(high) / len(high) - sum(low) / len(low)
    return gap >= 0.3, (f"mean IPR {sum(high) / len(high):.2f} over {len(high)} generalising models, "
                        f"{sum(low) / len(low):.2f} over {len(low)} memorising ones")


def _weight_decay_raises_ipr(rows, run=None):
    pairs = [(r0, r5) for r0 in _by(rows, wd=0.0, xi=lambda x: x <= 0.3) for r5 in _by(rows, wd=5.0, xi=r0["xi"])]
    higher = sum(r5["mean_ipr"] > r0["mean_ipr"] for r0, r5 in pairs)
    return bool(pairs) and higher == len(pairs), f"higher at wd 5 than at wd 0 for {higher} of {len(pairs)} xi <= 0.3"


def _pruning_removes_memorisation(rows, run=None):
    import pyarrow.parquet as pq

    chosen = {r.model: r for r in _by(rows, wd=0.0, xi=lambda x: x >= 0.1) if r.phase == "coexistence"}
    if not chosen or run is None or not (Path(run) / "prune-low.parquet").is_file():
        return False, "no coexistence model with xi >= 0.1 at wd 0 was pruned"
    curves = pq.read_table(Path(run) / "prune-low.parquet").to_pydict()
    ok = []
    for m in chosen:
        at = [k for k, model in enumerate(curves["model"]) if model == m]
        half = min(at, key=lambda k: abs(curves["fraction"][k] - 0.5))
        before, after = curves["corrupted_acc"][at[0]], curves["corrupted_acc"][half]
        ok.append(after <= 0.25 * before and curves["test_acc"][half] >= 0.9)
    return all(ok), (f"{sum(ok)} of {len(ok)} coexistence models at wd 0 (xi >= 0.1) keep test accuracy 0.9 with "
                     "their memorised accuracy cut to a quarter or less, half their neurons pruned low-IPR first")


def _same_phases_as_the_mlp(rows, run=None):
    noisy = max(r["xi"] for r in rows)
    wd = max(r["wd"] for r in rows)
    found = {(r["xi"] > 0, r["wd"] > 0): r.phase for r in rows}
    want = {(False, True): ("coexistence",), (True, False): ("memorization",), (True, True): GENERALISING[1:]}
    ok = all(found.get(k) in v for k, v in want.items())
    return ok, (f"xi 0, wd {wd:g}: {found.get((False, True))}; xi {noisy:g}, wd 0: {found.get((True, False))}; "
                f"xi {noisy:g}, wd {wd:g}: {found.get((True, True))}")


def _learns_the_periodic_solution(rows, run=None):
    r = rows[0]
    ok = r["test_acc"] >= 0.99 and r["mean_ipr"] >= 0.6 and r["analytic_similarity"] >= 0.6
    return ok, (f"test {r['test_acc']:.3f}, mean IPR {r['mean_ipr']:.2f}, similarity to the analytic neurons "
                f"{r['analytic_similarity']:.2f}")


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
    Claim(TO_GROK, "Hypothesis 2.1", "Generalising networks are made of periodic (high-IPR) neurons, memorising "
          "ones of low-IPR neurons.", "wd-xi", "mean neuron IPR of the coexistence and inversion models at least 0.3 "
          "above the memorisation models'", _ipr_separates_the_phases),
    Claim(TO_GROK, "Sec. Effect of regularization", "Weight decay turns the network's neurons into generalising "
          "(periodic) ones.", "wd-xi", "at every xi <= 0.3 the wd 5 model's mean IPR exceeds the wd 0 model's",
          _weight_decay_raises_ipr),
    Claim(TO_GROK, "Sec. Grokking with label noise (pruning)", "Pruning the low-IPR (memorising) neurons lowers "
          "the accuracy on the corrupted data and keeps the network generalising.", "wd-xi",
          "every coexistence model at wd 0 with xi >= 0.1, half its neurons pruned low-IPR first, keeps test "
          "accuracy 0.9 and loses three quarters of its memorised accuracy", _pruning_removes_memorisation),
    Claim(TO_GROK, "Fig. 7a", "A transformer shows the MLP's phases: memorisation of corrupted labels without "
          "regularisation, inversion with weight decay.", "transformer",
          "clean data with weight decay: coexistence; corrupted without: memorization; corrupted with: partial or "
          "full inversion", _same_phases_as_the_mlp),
    Claim(TO_GROK, "Fig. 7b", "A deeper ReLU MLP shows the same phases.", "deep-mlp",
          "clean data with weight decay: coexistence; corrupted without: memorization; corrupted with: partial or "
          "full inversion", _same_phases_as_the_mlp),
    Claim(POLYNOMIALS, "Fig. 3, eq. 6-8", "A network trained on multiplication generalises with neurons periodic "
          "in the discrete logarithm of the residues, like the analytic solution.", "mul",
          "test accuracy 0.99, mean IPR (log basis) and similarity to the analytic neurons 0.6 or more",
          _learns_the_periodic_solution),
    Claim(POLYNOMIALS, "Fig. 2, eq. 2-4", "A network trained on a sum of four terms groks, with periodic neurons "
          "like the analytic solution's.", "sum4",
          "test accuracy 0.99, mean IPR and similarity to the analytic neurons 0.6 or more",
          _learns_the_periodic_solution),
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
    """The grid and settings of a train experiment's spec (a preset, or grid axes and settings), resolved as the
    command line resolves them."""
    from fastgrok import presets
    from fastgrok.config import AXES

    request = presets.resolve(spec.get("preset"), {**dict.fromkeys(AXES), **spec.get("axes", {})},
                              spec.get("settings", {}), device)
    return request.grid, request.settings


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
    for name in exp.analyses:
        if (draw := ANALYSES[name][1]) is not None:
            draw(analysis, run)
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
        try:
            holds, numbers = claim.criterion(read_models(run), run)
        except (KeyError, AttributeError) as e:  # a column an analysis adds (mean_ipr) is missing
            table.append({"claim": claim, "verdict": "not run", "numbers": f"the run has no {e}"})
            continue
        table.append({"claim": claim, "verdict": "holds" if holds else "differs", "numbers": numbers})
    return table


def write_report(out: Path, names: list[str], quick: bool, ran: str = "") -> tuple[Path, Path]:
    """DIR/report.md (figures linked) and DIR/report.html (figures inlined): per claim the statement with its
    source, the criterion, the verdict with its numbers, and the experiment's figure. `ran`: where and how long."""
    table = verdicts(out, names)
    size = "--quick (reduced sizes, on a CPU)" if quick else "the papers' sizes"
    lines = [f"# fastgrok reproduce: {datetime.date.today().isoformat()}, {size}", "",
             f"{sum(t['verdict'] == 'holds' for t in table)} of {len(table)} claims hold. {ran}".strip(), "",
             "| paper | where | claim | criterion | verdict | numbers |", "| --- | --- | --- | --- | --- | --- |"]
    for t in table:
        c = t["claim"]
        lines.append(f"| {c.paper.split(' (')[0]} | {c.where} | {c.statement} | {c.criterion_text} | "
                     f"**{t['verdict']}** | {t['numbers']} |")
    lines.append("")
    for name in names:
        exp = EXPERIMENTS[name]
        lines += [f"## {name}", "", exp.about, ""]
        for analysis in exp.analyses:
            for figure in sorted((out / name).glob(ANALYSES[analysis][0])):
                lines += [f"![{name}: {analysis}]({name}/{figure.name})", ""]
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
    from fastgrok.device import device_name, resolve_device

    names, out = _selected(only), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began, trained = time.perf_counter(), []
    try:
        for name in names:
            done = run_experiment(name, out, quick, device, on_step)
            trained += [name] * (done != "kept")
            if on_experiment is not None:
                on_experiment(name, done)
    finally:
        ran = (f"On {device_name(resolve_device(device))}, fastgrok {__version__}: {time.perf_counter() - began:.0f} s "
               f"for this call, which trained or resumed {len(trained)} of the {len(names)} experiments.")
        report = write_report(out, names, quick, ran)
    return report
