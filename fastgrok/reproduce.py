"""`fastgrok reproduce`: the experiments of "To grok or not to grok" (Doshi, Das, He, Gromov, ICLR 2024) and of
"Grokking modular polynomials" (Doshi, He, Das, Gromov 2024) as ordinary runs in one folder, and a report that
checks each claim of the papers against them.

EXPERIMENTS says what each experiment trains, at the papers' size and at a reduced one (--quick, for a CPU);
CLAIMS is the table of claims: each one's statement with where the paper makes it (a section, figure or table),
the experiment it reads, and the criterion that decides whether it holds there, a function of the run's
models.csv rows (and its pruning curves or histories) that returns the verdict and the numbers behind it. Every
experiment is a run directory DIR/<name> (or several in it): a second call skips the complete ones and resumes
an interrupted one.
"""

from __future__ import annotations

import base64
import datetime
import functools
import html
import math
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
    an `analytic` solution's widths, or the `experts` built for polynomials; then the analyses its claims read
    (ANALYSES). A spec's "runs" (name -> axes and settings that differ) makes it several runs,
    DIR/<experiment>/<name>: settings a grid cannot vary (BatchNorm), compared."""

    about: str
    full: dict
    quick: dict
    kind: str = "train"  # or "analytic", or "experts" (experts.csv: the sequel's construction, nothing trained)
    analyses: tuple[str, ...] = ()


def _noisy_curves(analysis, run):
    """The training curves of each model trained on corrupted labels (the two-stage dynamics)."""
    from fastgrok.results import read_models

    return analysis.curves(run, models=",".join(str(r.model) for r in read_models(run) if r["xi"] > 0))


def _prune_generalising(order: str):
    """Prune, in IPR `order`, the models of To grok's Fig. 6 and 17: those at alpha 0.5 with xi >= 0.1 that
    generalise (coexistence, partial or full inversion)."""
    def draw(analysis, run):
        from fastgrok.results import read_models

        chosen = [r.model for r in _by(read_models(run), alpha=ROW, xi=lambda x: x >= 0.1) if r.phase in GENERALISING]
        if chosen:
            analysis.prune(run, order=order, models=",".join(map(str, chosen)))
    return draw


# what each analysis writes into the run (the report shows its figures), and how it is run
ANALYSES = {
    "phase": ("phase-*-vs-*.png", lambda analysis, run: analysis.phase_diagram(run)),
    "ipr": ("ipr-*.png", lambda analysis, run: analysis.ipr(run)),
    **{f"prune-{order}": (f"prune-{order}.png", _prune_generalising(order)) for order in ("low", "high", "random")},
    "curves": ("curves-model*.png", _noisy_curves),
    "prune-every-model": ("prune-low.png", lambda analysis, run: analysis.prune(run, order="low")),
    "learnability": ("learnability.png", lambda analysis, run: analysis.learnability(run)),
    "accuracy": ("accuracy-vs-width.png", None),  # drawn by `analytic` itself
}

# the polynomials whose learnability the sequel predicts (fastgrok.polynomials.SURVEY; kept in step by a test)
SURVEY_OPS = ("x+y", "2x+3y", "x*y", "x^2*y", "x^2+y^2", "x^3+2y", "(x+y)^3", "(2x+3y)^4", "(4x+y^2)^3", "x^2+xy",
              "x^3+xy", "xy+y^2", "(2x+3y)^4-x^2", "(4x+y^2)^3+xy")
# the polynomials of the sequel's App. B table
APP_B = ("2x^4y+x^2y^2+3xy^3", "x^5y^3+4x^2y+5x^2y^3", "7x^4y^4+2x^3y^2+4x^2y^5")
# the papers' phase diagrams: 17 data fractions by 19 corruption levels (To grok, App. A.1), each a grid axis
DIAGRAM = {"alpha": "0.1:0.9:17", "xi": "0:0.9:19"}
# --quick's: one data fraction, 13 corruption levels, p 47 and N 128 (a diagram's row in about a minute on 2 cores)
QUICK_ROW = {"xi": "0:0.6:13", "width": "128"}
# the deeper families of Fig. 7 as the paper trains them (the transformer d 128, the 3-layer MLP N 500; 3 seeds) and
# at --quick's size: an experiment's spec is one of them with its own axes added (_family)
TRANSFORMER = {"axes": {"width": "128", "lr": "0.001", "seed": "0,1,2"},
               "settings": {"model": "transformer", "steps": 3000}}
QUICK_TRANSFORMER = {"axes": {"width": "64", "lr": "0.005"},
                     "settings": {"model": "transformer", "p": 23, "steps": 1500}}
DEEP_MLP = {"axes": {"width": "500", "lr": "0.001", "seed": "0,1,2"},
            "settings": {"model": "deep-mlp", "depth": 3, "steps": 5000}}
QUICK_DEEP_MLP = {"axes": {"alpha": "0.6", "width": "256", "lr": "0.003"},
                  "settings": {"model": "deep-mlp", "depth": 2, "p": 41, "steps": 3000}}


def _family(base: dict, axes: dict, **more) -> dict:
    """A spec: a family's base (TRANSFORMER, ...) with an experiment's axes (they win) and, say, its "runs"."""
    return {"axes": {**base["axes"], **axes}, "settings": dict(base["settings"]), **more}


# To grok's Fig. 12: the Fig. 7a transformer, a deeper one, one with more heads and one with weight tying
TRANSFORMER_CONFIGS = {"base": {}, "layers-2": {"settings": {"layers": 2}}, "heads-8": {"settings": {"heads": 8}},
                       "tied": {"settings": {"tie": True}}}


def _variant(about: str, settings: dict) -> Experiment:
    """The weight-decay diagram with other settings, logged every 20 steps (forgetting told from confusion by the
    first step at test accuracy 0.9); --quick: xi 0-0.6 in 4 levels at wd 0, 5 and 20, p 47, N 128."""
    return Experiment(about + ": phases over alpha and xi at weight decay 0, 5, 15 and 20 (--quick: xi 0-0.6 in 4 "
                      "levels at wd 0, 5 and 20)",
                      full={"axes": {**DIAGRAM, "wd": "0,5,15,20"}, "settings": {**settings, "log_every": 20}},
                      quick={"axes": {"xi": "0:0.6:4", "wd": "0,5,20", "width": "128"},
                             "settings": {"p": 47, **settings, "log_every": 20}},
                      analyses=("phase",))


EXPERIMENTS = {
    "weight-decay": Experiment(
        "phases over the data fraction alpha and corruption xi at weight decay 0, 5, 15 and 20 (To grok's Fig. 3a; "
        "--quick: the row alpha 0.5), with the IPR of every model's neurons (Fig. 4) and the generalising models of "
        "the row alpha 0.5 with xi >= 0.1 pruned low-IPR first, high-IPR first (Fig. 6, 17; App. I.2's losses) and "
        "in a random order (a control the paper does not draw)",
        full={"axes": {**DIAGRAM, "wd": "0,5,15,20"}, "settings": {}},
        quick={"axes": {**QUICK_ROW, "wd": "0,5,15,20"}, "settings": {"p": 47}},
        analyses=("phase", "ipr", "prune-low", "prune-high", "prune-random")),
    "dynamics": Experiment(
        "training curves at alpha 0.5, clean (xi 0) and corrupted (xi 0.35; --quick: 0.2, which p 47 and N 128 "
        "invert) labels, weight decay 0, 5 and 15, logged every 10 steps (To grok's Fig. 1 and 2)",
        full={"axes": {"xi": "0,0.35", "wd": "0,5,15"}, "settings": {"log_every": 10}},
        quick={"axes": {"xi": "0,0.2", "wd": "0,5,15", "width": "128"}, "settings": {"p": 47, "log_every": 10}},
        analyses=("curves",)),
    "dropout": Experiment(
        "phases over alpha and xi with dropout 0, 0.3, 0.6 and 0.9 on the pre-activation, no weight decay (To "
        "grok's Fig. 3 dropout panels and Fig. 4; --quick: the row alpha 0.5, dropout up to 0.6)",
        full={"axes": {**DIAGRAM, "dropout": "0,0.3,0.6,0.9"}, "settings": {}},
        quick={"axes": {**QUICK_ROW, "dropout": "0,0.3,0.6"}, "settings": {"p": 47}},
        analyses=("phase", "ipr")),
    "batchnorm": Experiment(
        "minibatches of 64 (lr 0.005, 8000 steps: To grok's Fig. 5) with BatchNorm after the activation and "
        "without: phases over alpha and xi (--quick: alpha 0.65, xi 0-0.3), the neurons' IPR and BatchNorm weights",
        full={"axes": {**DIAGRAM, "lr": "0.005"}, "settings": {"batch_size": 64, "steps": 8000, "log_every": 400},
              "runs": {"batchnorm": {"settings": {"batchnorm": True}}, "minibatch": {}}},
        quick={"axes": {"alpha": "0.65", "xi": "0,0.1,0.2,0.3", "width": "128", "lr": "0.005"},
               "settings": {"p": 47, "batch_size": 64, "steps": 8000, "log_every": 400},
               "runs": {"batchnorm": {"settings": {"batchnorm": True}}, "minibatch": {}}},
        analyses=("phase", "ipr")),
    "width": Experiment(
        "phases over alpha and xi at widths 500 and 5000, no regularisation (To grok's App. O; --quick: the row "
        "alpha 0.5 at widths 64, 128 and 512)",
        full={"axes": {**DIAGRAM, "width": "500,5000"}, "settings": {}},
        quick={"axes": {"xi": "0:0.6:7", "width": "64,128,512"}, "settings": {"p": 47}},
        analyses=("phase",)),
    "mul-diagram": _variant("multiplication's phases, compared cell by cell with weight-decay's addition (To grok's "
                            "App. P)", {"op": "mul"}),
    "cross-entropy": _variant("phases with the cross-entropy loss (To grok's App. M)", {"loss": "ce"}),
    "relu": _variant("phases of the ReLU MLP (To grok's App. N)", {"act": "relu"}),
    "prune-width": Experiment(
        "how many neurons a generalising network needs: models of widths 500 to 10,000, 40 seeds, alpha 0.5, "
        "xi 0.35, wd 1, lr 0.005, each pruned low-IPR first (To grok's App. Q, Fig. 32; --quick: p 47, widths 64 "
        "to 512, xi 0.2 and wd 2, where p 47's wider networks generalise)",
        full={"axes": {"xi": "0.35", "wd": "1", "lr": "0.005", "width": "500,1000,2000,5000,10000",
                       "seed": "0:39:40"}, "settings": {}},
        quick={"axes": {"xi": "0.2", "wd": "2", "lr": "0.005", "width": "64,128,256,512"}, "settings": {"p": 47}},
        analyses=("prune-every-model",)),
    "analytic-width": Experiment(
        "the analytic solution of addition against the width (Gromov 2023, as the paper uses it)",
        full={"p": 97, "widths": "10,20,50,100,150,200,300,500"},
        quick={"p": 97, "widths": "10,20,50,100,150,200,300,500"},
        kind="analytic", analyses=("accuracy",)),
    "analytic-terms": Experiment(
        "the analytic solution of S-term addition against the width, p 23 (the sequel's Fig. 1), seed 0",
        full={"p": 23, "widths": {2: "10,20,50,100,200,500,1000,2000", 3: "50,100,200,500,1000,2000,5000,10000",
                                  4: "500,1000,2000,5000,10000,20000"}},
        quick={"p": 23, "widths": {2: "10,20,50,100,200,500,1000,2000", 3: "50,100,200,500,1000,2000,5000"}},
        kind="analytic", analyses=("accuracy",)),
    "transformer": Experiment(
        "the encoder-only transformer (To grok's Fig. 7a: d 128, lr 0.001, 3000 steps, 3 seeds; weight decay 10 and "
        "50 as its panels read, and 0): phases over alpha and xi, and its embeddings' IPR (--quick: p 23, alpha "
        "0.9, xi 0 and 0.15, wd 0 and 5)",
        full=_family(TRANSFORMER, {**DIAGRAM, "wd": "0,10,50"}),
        quick=_family(QUICK_TRANSFORMER, {"xi": "0,0.15", "wd": "0,5", "alpha": "0.9"}),
        analyses=("phase", "ipr")),
    "deep-mlp": Experiment(
        "the 3-layer ReLU MLP (To grok's Fig. 7b: N 500, lr 0.001, 5000 steps, 3 seeds; weight decay 0 and 15): "
        "phases over alpha and xi, and its first layer's IPR (--quick: 2 layers of 256, p 41, alpha 0.6, xi 0 and "
        "0.2)",
        full=_family(DEEP_MLP, {**DIAGRAM, "wd": "0,15"}),
        quick=_family(QUICK_DEEP_MLP, {"xi": "0,0.2", "wd": "0,15"}),
        analyses=("phase", "ipr")),
    "transformer-configs": Experiment(
        "the transformer at alpha 0.8, xi 0.2 (To grok's Fig. 12: d 128) in four configurations, as four runs: the "
        "Fig. 7a model (1 block, 4 heads), 2 blocks, 8 heads, and weight tying; lr 0.001, 3000 steps, wd 10 (ours: "
        "the figure does not give it), 3 seeds (--quick: p 23, d 64, lr 0.005, 1500 steps, wd 5, 2 seeds)",
        full=_family(TRANSFORMER, {"alpha": "0.8", "xi": "0.2", "wd": "10"}, runs=TRANSFORMER_CONFIGS),
        quick=_family(QUICK_TRANSFORMER, {"alpha": "0.8", "xi": "0.2", "wd": "5", "seed": "0,1"},
                      runs=TRANSFORMER_CONFIGS),
        analyses=("ipr",)),
    "transformer-dropout": Experiment(
        "the transformer with dropout 0, 0.05, 0.1, 0.2 and 0.3 and no weight decay (To grok's Fig. 13: phases over "
        "alpha and xi, d 128, lr 0.001, 3000 steps, 3 seeds; --quick: p 23, d 64, lr 0.005, 1500 steps, alpha 0.9 "
        "and xi 0.1, Fig. 13's selected point)",
        full=_family(TRANSFORMER, {**DIAGRAM, "dropout": "0,0.05,0.1,0.2,0.3"}),
        quick=_family(QUICK_TRANSFORMER, {"alpha": "0.9", "xi": "0.1", "dropout": "0,0.05,0.1,0.2,0.3"}),
        analyses=("phase", "ipr")),
    "deep-mlp-configs": Experiment(
        "the 3-layer ReLU MLP (N 500, lr 0.001, 5000 steps, weight decay 0 and 15 as Fig. 7b's, 3 seeds) in four "
        "runs: the standard parameterisation N(0, 2/fan_in) and the lazier N(0, 2/N^(2/3)) at alpha 0.8, xi 0.2 (To "
        "grok's Fig. 14), BatchNorm after every hidden layer at alpha 0.8, xi 0.1 (Fig. 15), and dropout 0.05 "
        "without weight decay at alpha 0.4-0.8, xi 0.1 and 0.2 (App. G) (--quick: the deep-mlp experiment's size, "
        "2 layers of 256, p 41, alpha 0.6, 3000 steps, one seed, at the paper's lr 0.001, where the lazier models "
        "train (at 0.003 they forget); BatchNorm and dropout at wd 0, xi 0.1 and 0.2)",
        full=_family(DEEP_MLP, {"alpha": "0.8", "xi": "0.2", "wd": "0,15"},
                     runs={"he": {}, "lazy": {"settings": {"init": "lazy"}},
                           "batchnorm": {"axes": {"xi": "0.1"}, "settings": {"batchnorm": True}},
                           "dropout": {"axes": {"alpha": "0.4,0.6,0.8", "xi": "0.1,0.2", "wd": "0",
                                                "dropout": "0.05"}}}),
        quick=_family(QUICK_DEEP_MLP, {"xi": "0.2", "wd": "0,15", "lr": "0.001"},
                      runs={"he": {}, "lazy": {"settings": {"init": "lazy"}},
                            "batchnorm": {"axes": {"xi": "0.1", "wd": "0"}, "settings": {"batchnorm": True}},
                            "dropout": {"axes": {"xi": "0.2", "wd": "0", "dropout": "0.05"}}}),
        analyses=("ipr",)),
    "learnability-deep": Experiment(
        "Hypothesis 5.2 beyond the 2-layer MLP: a transformer (d 128, lr 0.001, wd 1, 3000 steps) and the 3-layer "
        "MLP (N 500, lr 0.001, wd 15, 5000 steps) on the 14 surveyed polynomials, alpha 0.5 and 0.9, 2 seeds, as two "
        "runs (--quick: p 23, one seed, three learnable and two not; the transformer d 64 at alpha 0.9, 4000 steps; "
        "the MLP 2 layers of 256 at alpha 0.5)",
        full={"axes": {"op": ",".join(SURVEY_OPS), "alpha": "0.5,0.9", "xi": "0", "seed": "0,1"}, "settings": {},
              "runs": {"transformer": {"axes": {"width": "128", "lr": "0.001", "wd": "1"},
                                       "settings": {"model": "transformer", "steps": 3000}},
                       "deep-mlp": {"axes": {"width": "500", "lr": "0.001", "wd": "15"},
                                    "settings": {"model": "deep-mlp", "depth": 3, "steps": 5000}}}},
        quick={"axes": {"op": "x+y,(2x+3y)^4,x*y,(2x+3y)^4-x^2,x^2+xy", "xi": "0"}, "settings": {"p": 23},
               "runs": {"transformer": {"axes": {"alpha": "0.9", "width": "64", "lr": "0.005", "wd": "1"},
                                        "settings": {"model": "transformer", "steps": 4000}},
                        "deep-mlp": {"axes": {"alpha": "0.5", "width": "256", "lr": "0.003", "wd": "15"},
                                     "settings": {"model": "deep-mlp", "depth": 2, "steps": 3000}}}},
        analyses=("learnability",)),
    "experts": Experiment(
        "the sequel's construction for polynomials no network learns by training (its App. B): a multiplication "
        "expert (N 500) per monomial, a softmax (beta 100), a 3-term addition expert (N 2000), at p 97 and 23",
        full={"ops": APP_B, "p": (97, 23), "widths": (500, 2000)},
        quick={"ops": APP_B, "p": (97, 23), "widths": (500, 2000)},
        kind="experts"),
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
        "which polynomials a network learns: 9 of the form h(g1(x)+g2(y)), 5 not (the sequel's Section 5; --quick: "
        "the polynomials-cpu preset at alpha 0.5 and 0.9)",
        full={"preset": "polynomials"},
        quick={"preset": "polynomials-cpu", "axes": {"alpha": "0.5,0.9"}},
        analyses=("learnability",)),
}


def _by(rows, **where):
    """The rows whose columns match: a value (floats to 1e-9: grid values from a range), or a predicate."""
    def match(value, want):
        if callable(want):
            return want(value)
        if isinstance(want, float) and value is not None:
            return math.isclose(value, want, abs_tol=1e-9)
        return value == want
    return [r for r in rows if all(match(r[k], v) for k, v in where.items())]


def _share(rows, phases: tuple[str, ...]) -> float:
    return sum(r.phase in phases for r in rows) / max(1, len(rows))


def _phases(rows) -> str:
    return ", ".join(f"{p} {n}" for p, n in Counter(r.phase for r in rows).most_common())


GENERALISING = ("coexistence", "partial_inversion", "full_inversion")
INVERTING = GENERALISING[1:]
ROW = 0.5  # the data fraction of the diagrams' row that --quick trains (and of To grok's Fig. 1, 4 and 6)


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: its statement, where the paper makes it, the experiment that tests it, and the
    criterion: (rows, run) -> (holds, the numbers behind the verdict), from the experiment's models.csv rows and,
    for what they do not hold (pruning curves, training histories), its run directory; with `also`, the rows of
    those experiments too. `criterion_text` states the criterion as the report prints it."""

    paper: str
    where: str
    statement: str
    experiment: str
    criterion_text: str
    criterion: Callable[[list, Path | None], tuple[bool, str]] = field(repr=False)
    also: tuple[str, ...] = ()  # experiments whose rows the criterion compares with (each row has `experiment`)


def _coexistence_without_noise(rows, run=None):
    clean = _by(rows, alpha=ROW, xi=0.0, wd=lambda w: w <= 5)
    share = _share(clean, ("coexistence",))
    return bool(clean) and share == 1.0, f"{share:.0%} of the xi 0, wd <= 5 models generalise ({len(clean)} models)"


def _coexistence_with_noise(rows, run=None):
    noisy = _by(rows, alpha=ROW, wd=0.0, xi=lambda x: 0.1 <= x <= 0.2)
    memorised = [r["corrupted_acc"] for r in noisy if r.phase == "coexistence"]
    return bool(noisy) and len(memorised) == len(noisy), (
        f"{len(memorised)} of {len(noisy)} models in coexistence"
        + (f", recalling {min(memorised):.0%}-{max(memorised):.0%} of their corrupted labels" if memorised else ""))


def _memorization_without_regularisation(rows, run=None):
    noisy = _by(rows, alpha=ROW, wd=0.0, xi=lambda x: x >= 0.5)
    share = _share(noisy, ("memorization",))
    return bool(noisy) and share == 1.0, f"{share:.0%} of the wd 0, xi >= 0.5 models memorise ({_phases(noisy)})"


def _inversion_with_weight_decay(rows, run=None):
    mid = _by(rows, alpha=ROW, wd=5.0, xi=lambda x: 0.15 <= x <= 0.3)
    share = _share(mid, INVERTING)
    return share >= 0.8, f"{share:.0%} of the wd 5, xi 0.15-0.3 models invert ({_phases(mid)})"


def _forgot(r) -> bool:
    """Forgetting proper: test accuracy 0.9 at a logged step, then ended below (the phase lumps in confusion: a
    model that never generalised)."""
    return r.phase == "forgetting" and r["test90_step"] is not None


def _forgetting_with_strong_weight_decay(rows, run=None):
    found = []
    for wd in (20.0, 15.0):
        strong = _by(rows, alpha=ROW, wd=wd)
        never = sum(r.phase == "forgetting" and not _forgot(r) for r in strong)
        found.append((sum(map(_forgot, strong)), len(strong), never))
    (forgot, of, never), at15 = found
    return of > 0 and forgot > of / 2, (f"{forgot} of {of} models at wd 20 generalised then forgot, {never} never "
                                        f"generalised (confusion); at wd 15 {at15[0]} of {at15[1]} forgot")


def _no_forgetting(rows, run=None):
    forgot = [r for r in rows if _forgot(r)]
    strongest = max(r["wd"] for r in rows)
    confused = [r for r in _by(rows, wd=strongest) if r.phase == "forgetting" and not _forgot(r)]
    return not forgot and bool(confused), (f"{len(forgot)} of {len(rows)} models generalised then forgot; "
                                           f"{len(confused)} at wd {strongest:g} never generalised (confusion)")


def _same_phases_for_mul(rows, run=None):
    add = {(r["alpha"], r["xi"], r["wd"]): r.phase for r in rows if r["experiment"] == "weight-decay"}
    mul = [r for r in rows if r["experiment"] == "mul-diagram"]
    shared = [r for r in mul if (r["alpha"], r["xi"], r["wd"]) in add]
    same = sum(r.phase == add[r["alpha"], r["xi"], r["wd"]] for r in shared)
    return bool(shared) and same >= 0.8 * len(shared), (f"the same phase in {same} of {len(shared)} cells "
                                                        f"({_phases(mul)} for multiplication)")


def _ipr_separates_the_phases(rows, run=None):
    high = [r["mean_ipr"] for r in rows if r.phase in GENERALISING]
    low = [r["mean_ipr"] for r in rows if r.phase == "memorization"]
    if not high or not low:
        return False, f"{len(high)} generalising and {len(low)} memorising models: both are needed"
    gap = sum(high) / len(high) - sum(low) / len(low)
    return gap >= 0.3, (f"mean IPR {sum(high) / len(high):.2f} over {len(high)} generalising models, "
                        f"{sum(low) / len(low):.2f} over {len(low)} memorising ones")


def _raises_ipr(axis: str, value: float):
    """Criterion: the regulariser `axis` at `value` raises the mean IPR over 0 at every xi <= 0.3 (and alpha)."""
    def criterion(rows, run=None):
        pairs = [(r0, r1) for r0 in _by(rows, xi=lambda x: x <= 0.3, **{axis: 0.0})
                 for r1 in _by(rows, xi=r0["xi"], alpha=r0["alpha"], **{axis: value})]
        higher = sum(r1["mean_ipr"] > r0["mean_ipr"] for r0, r1 in pairs)
        mean = [sum(r[k]["mean_ipr"] for r in pairs) / max(1, len(pairs)) for k in (0, 1)]
        return bool(pairs) and higher == len(pairs), (f"higher at {axis} {value:g} than at 0 in {higher} of "
                                                      f"{len(pairs)} cells with xi <= 0.3 (mean {mean[1]:.2f} vs "
                                                      f"{mean[0]:.2f})")
    return criterion


@functools.lru_cache(maxsize=8)
def _read_prune(path: Path, mtime_ns: int) -> dict[str, list]:
    """A pruning file's columns, read once for all the claims that read it (mtime_ns: a rewritten file is read
    again)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def _curves(run, order: str, models: set[int]) -> dict[int, dict[str, list]] | None:
    """The pruning curves (prune-ORDER.parquet) of `models`, each column in pruning order, or None where the run
    was not pruned that way."""
    path = None if run is None else Path(run) / f"prune-{order}.parquet"
    if not models or path is None or not path.is_file():
        return None
    table = _read_prune(path, path.stat().st_mtime_ns)
    out: dict[int, dict[str, list]] = {}
    for k, m in enumerate(table["model"]):  # the file holds each model's levels in order
        if m in models:
            mine = out.setdefault(m, {name: [] for name in table if name != "model"})
            for name in mine:
                mine[name].append(table[name][k])
    return out


def _pruned(run, order: str, rows, phase: str = "coexistence", wd: float | None = 0.0) -> dict | None:
    """The models in `phase` at alpha 0.5 with xi >= 0.1 (at weight decay `wd`; None: any): their metrics before
    pruning and at each pruned fraction."""
    where = {} if wd is None else {"wd": wd}
    return _curves(run, order, {r.model for r in _by(rows, alpha=ROW, xi=lambda x: x >= 0.1, **where)
                                if r.phase == phase})


def _first_below(curve: dict, metric: str, level: float = 0.5) -> float:
    """The smallest pruned fraction at which `metric` is below `level` (1 where it never is)."""
    return next((f for f, v in zip(curve["fraction"], curve[metric]) if v < level), 1.0)


def _memorisation_outlasts_generalisation(rows, run=None):
    curves = _pruned(run, "high", rows)
    if not curves:
        return False, "no coexistence model with xi >= 0.1 at wd 0 was pruned high-IPR first"
    falls = [(_first_below(c, "clean_acc"), _first_below(c, "corrupted_acc")) for c in curves.values()]
    ok = [clean < corrupted for clean, corrupted in falls]
    return all(ok), (f"{sum(ok)} of {len(ok)} models lose their uncorrupted accuracy first; below 0.5 at fractions "
                     + ", ".join(f"{a:.2f} against {b:.2f}" for a, b in falls))


def _partial_inversion_remembers_when_pruned(rows, run=None):
    curves = _pruned(run, "high", rows, "partial_inversion", wd=None)
    if not curves:
        return False, f"no partial inversion model with xi >= 0.1 was pruned ({_phases(_by(rows, alpha=ROW))})"
    found, ok = [], []
    for c in curves.values():
        start, half = c["corrupted_acc"][0], [k for k, f in enumerate(c["fraction"]) if f <= 0.5]
        gain = max((c["corrupted_acc"][k] - start for k in half if c["clean_acc"][k] >= 0.9), default=0.0)
        ok.append(gain >= 0.2 and _at(c, 0.5, "test_acc") < 0.5)
        found.append(f"corrupted {start:.2f} rising by {gain:.2f}, test {_at(c, 0.5, 'test_acc'):.2f} at half pruned")
    return all(ok), f"{sum(ok)} of {len(ok)} models: " + "; ".join(found)


def _full_inversion_stays_inverted(rows, run=None):
    curves = _pruned(run, "high", rows, "full_inversion", wd=None)
    if not curves:
        return False, f"no full inversion model with xi >= 0.1 was pruned ({_phases(_by(rows, alpha=ROW))})"
    gains = [max(v for f, v in zip(c["fraction"], c["corrupted_acc"]) if f <= 0.8) - c["corrupted_acc"][0]
             for c in curves.values()]
    return all(g <= 0.1 for g in gains), (f"{sum(g <= 0.1 for g in gains)} of {len(gains)} models; their corrupted "
                                           f"accuracy rises by {min(gains):.2f}-{max(gains):.2f} at most")


def _train_loss_monotonic(rows, run=None):
    from fastgrok.analysis import rank_correlation
    import torch

    rho = []
    for order in ("low", "high"):
        for c in (_curves(run, order, {r.model for r in rows}) or {}).values():
            pair = torch.tensor([c["fraction"], c["train_loss"]], dtype=torch.float64)
            rho.append(rank_correlation(pair[:1], pair[1:]).item())
    if not rho:
        return False, "no model was pruned"
    return min(rho) >= 0.9, (f"rank correlation of train loss and pruned fraction {min(rho):.2f}-{max(rho):.2f} over "
                             f"{len(rho)} curves (low- and high-IPR first)")


def _periodic_neurons_lower_the_test_loss(rows, run=None):
    curves = _pruned(run, "high", rows, wd=None)
    if not curves:
        return False, "no coexistence model with xi >= 0.1 was pruned high-IPR first"
    ratio = [_at(c, 0.3, "test_loss") / c["test_loss"][0] for c in curves.values()]
    return min(ratio) > 1, (f"test loss at 30% pruned high-IPR first {min(ratio):.1f}-{max(ratio):.1f} times its "
                            f"start in {len(ratio)} coexistence models")


def _low_ipr_neurons_cancel(rows, run=None):
    curves = _pruned(run, "low", rows)
    if not curves:
        return False, "no coexistence model with xi >= 0.1 at wd 0 was pruned low-IPR first"
    found = [(c["test_acc"][0], _at(c, 0.1, "test_acc"), c["test_loss"][0], _at(c, 0.1, "test_loss"))
             for c in curves.values()]
    ok = [acc1 >= acc0 - 0.1 and loss1 > loss0 for acc0, acc1, loss0, loss1 in found]
    return all(ok), f"{sum(ok)} of {len(ok)} models: " + "; ".join(
        f"test {a0:.2f} -> {a1:.2f}, loss {l0:.4f} -> {l1:.4f}" for a0, a1, l0, l1 in found)


def _at(curve: dict, fraction: float, metric: str) -> float:
    k = min(range(len(curve["fraction"])), key=lambda i: abs(curve["fraction"][i] - fraction))
    return curve[metric][k]


def _pruning_removes_memorisation(rows, run=None):
    curves = _pruned(run, "low", rows)
    if not curves:
        return False, "no coexistence model with xi >= 0.1 at wd 0 was pruned"
    ok = [_at(c, 0.5, "corrupted_acc") <= 0.25 * c["corrupted_acc"][0] and _at(c, 0.5, "test_acc") >= 0.9
          for c in curves.values()]
    return all(ok), (f"{sum(ok)} of {len(ok)} coexistence models at wd 0 (xi >= 0.1) keep test accuracy 0.9 with "
                     "their memorised accuracy cut to a quarter or less, half their neurons pruned low-IPR first")


def _pruning_high_first_breaks_generalisation(rows, run=None):
    curves = _pruned(run, "high", rows)
    if not curves:
        return False, "no coexistence model with xi >= 0.1 at wd 0 was pruned high-IPR first"
    ok = [_at(c, 0.3, "test_acc") < 0.5 and _at(c, 0.3, "corrupted_acc") >= 0.5 * c["corrupted_acc"][0]
          for c in curves.values()]
    numbers = (f"{sum(ok)} of {len(ok)} coexistence models at wd 0 (xi >= 0.1), 30% of their neurons pruned "
               "high-IPR first, fall below test accuracy 0.5 and keep half their memorised accuracy")
    if (randomly := _pruned(run, "random", rows)):
        mean = lambda metric: sum(_at(c, 0.3, metric) for c in randomly.values()) / len(randomly)  # noqa: E731
        numbers += (f"; in a random order they keep test {mean('test_acc'):.2f} and memorised "
                    f"{mean('corrupted_acc'):.2f} (mean)")
    return all(ok), numbers


def _histories(run, models) -> dict[int, dict[str, list]]:
    """Each model's logged steps and accuracies and mean IPR (history/*.parquet), in step order."""
    from fastgrok.results import read_history

    table = read_history(run).to_pydict()
    out = {m: {k: [] for k in ("step", "train_acc", "test_acc", "ipr")} for m in models}
    for k in sorted(range(len(table["step"])), key=lambda i: table["step"][i]):
        if (m := table["model"][k]) in out:
            for name in out[m]:
                out[m][name].append(table[name][k])
    return out


def _needed_neurons(rows, run) -> dict[int, list[int]]:
    """Each width: for each model that generalises, the neurons it needs: its width less the most neurons pruned
    low-IPR first (prune-low.parquet) with its test accuracy still 0.9 at every level up to them."""
    curves = _curves(run, "low", {r.model for r in rows}) or {}
    needed: dict[int, list[int]] = {}
    for r in rows:
        c = curves.get(r.model)
        if not c or c["test_acc"][0] < 0.9:
            continue
        kept = next((n for n, following in zip(c["pruned"], [*c["test_acc"][1:], 0.0]) if following < 0.9),
                    c["pruned"][-1])
        needed.setdefault(r["width"], []).append(r["width"] - kept)
    return dict(sorted(needed.items()))


def _needed_grows_sublinearly(rows, run=None):
    import numpy as np

    needed = {w: sum(n) / len(n) for w, n in _needed_neurons(rows, run).items()}
    if len(needed) < 2:
        return False, f"generalising models at {len(needed)} width(s): two or more are needed"
    exponent = float(np.polyfit(np.log(list(needed)), np.log(list(needed.values())), 1)[0])
    return exponent < 1, (", ".join(f"N {w}: {n:.0f}" for w, n in needed.items())
                          + f" neurons needed (mean over the generalising seeds); exponent {exponent:.2f}")


def _ipr_rises_with_grokking(rows, run=None):
    import numpy as np

    clean = _by(rows, xi=0.0, wd=5.0)
    if not clean or run is None:
        return False, "no clean model at wd 5"
    h = _histories(run, [clean[0].model])[clean[0].model]
    ipr, test = h["ipr"], h["test_acc"]
    follows = float(np.corrcoef(ipr, test)[0, 1])
    ok = ipr[0] < 0.2 and ipr[-1] > 0.6 and test[-1] >= 0.9 and follows >= 0.8
    return ok, (f"mean IPR {ipr[0]:.2f} at step 0, {ipr[-1]:.2f} at step {h['step'][-1]}; test accuracy "
                f"{test[-1]:.2f}; correlation of IPR and test accuracy over {len(ipr)} logged steps {follows:.2f}")


def _two_stages(rows, run=None):
    inverted = [r for r in rows if r["xi"] > 0 and r["wd"] > 0 and r.phase in INVERTING]
    if not inverted or run is None:
        return False, f"no model with weight decay inverted its corrupted labels ({_phases(rows)})"
    found, ok = [], []
    histories = _histories(run, [r.model for r in inverted])
    for r in inverted:
        h = histories[r.model]
        both = [k for k, (a, b) in enumerate(zip(h["train_acc"], h["test_acc"])) if a >= 0.9 and b >= 0.9]
        ok.append(bool(both) and h["train_acc"][-1] < 0.9)
        found.append(f"wd {r['wd']:g}, xi {r['xi']:g}: " + (
            f"train {h['train_acc'][both[0]]:.2f} and test {h['test_acc'][both[0]]:.2f} at step {h['step'][both[0]]}"
            if both else "never train and test 0.9 together") + f", train {h['train_acc'][-1]:.2f} at the end "
            f"(1 - xi = {1 - r['xi']:.2f})")
    return all(ok), "; ".join(found)


def _dropout_inverts(rows, run=None):
    mid = _by(rows, alpha=ROW, dropout=lambda d: d >= 0.3, xi=lambda x: 0.15 <= x <= 0.3)
    share = _share(mid, INVERTING)
    return share >= 0.5, f"{share:.0%} of the dropout >= 0.3, xi 0.15-0.3 models invert ({_phases(mid)})"


def _bn_weights_track_ipr(rows, run=None):
    noisy = [r for r in rows if r["run"] == "batchnorm" and r["xi"] > 0]
    rho = [r["bn_ipr_correlation"] for r in noisy]
    return bool(rho) and min(rho) >= 0.5, (f"rank correlation {min(rho):.2f}-{max(rho):.2f} over {len(rho)} models"
                                           if rho else "no BatchNorm model trained on corrupted labels")


def _bn_keeps_ipr(rows, run=None):
    pairs = [(bn, plain) for bn in _by(rows, run="batchnorm")
             for plain in _by(rows, run="minibatch", xi=bn["xi"], alpha=bn["alpha"])]
    gaps = [abs(bn["mean_ipr"] - plain["mean_ipr"]) for bn, plain in pairs]
    return bool(gaps) and max(gaps) <= 0.1, (f"mean IPR with and without BatchNorm differ by at most {max(gaps):.2f} "
                                             f"over {len(gaps)} cells" if gaps else "no pair of models to compare")


def _bn_ignores_corruption(rows, run=None):
    cell = {r["run"]: r for r in _by(rows, alpha=0.65, xi=0.2)}
    if set(cell) != {"batchnorm", "minibatch"}:
        return False, "the alpha 0.65, xi 0.2 models were not both trained"
    bn, plain = cell["batchnorm"], cell["minibatch"]
    ok = bn.phase in INVERTING and bn["corrupted_acc"] < plain["corrupted_acc"]
    return ok, (f"with BatchNorm {bn.phase}, recalling {bn['corrupted_acc']:.2f} of the corrupted labels; without "
                f"{plain.phase}, recalling {plain['corrupted_acc']:.2f}")


def _wider_memorises(rows, run=None):
    share = {w: _share(_by(rows, width=w), GENERALISING) for w in sorted({r["width"] for r in rows})}
    narrow, wide = min(share), max(share)
    return share[wide] < share[narrow], ", ".join(f"N {w}: {s:.0%} generalise" for w, s in share.items())


def _one_row(rows):
    """A diagram's alpha 0.5 row, or all the rows of an experiment trained at one other alpha."""
    return _by(rows, alpha=ROW) or rows


def _same_phases_as_the_mlp(noisy: float):
    """Criterion: at alpha 0.5 (or the one alpha trained), the majority phase over seeds of clean data at the
    strongest weight decay, and of corruption `noisy` without weight decay and at the strongest."""
    def criterion(rows, run=None):
        row = _one_row(rows)
        wd = max(r["wd"] for r in row)
        cells = {"clean": (0.0, wd), "corrupted": (noisy, 0.0), "both": (noisy, wd)}
        found = {}
        for name, (xi, w) in cells.items():
            seeds = Counter(r.phase for r in _by(row, xi=xi, wd=w))
            found[name] = seeds.most_common(1)[0][0] if seeds else None
        ok = (found["clean"] == "coexistence" and found["corrupted"] == "memorization"
              and found["both"] in INVERTING)
        return ok, (f"xi 0, wd {wd:g}: {found['clean']}; xi {noisy:g}, wd 0: {found['corrupted']}; xi {noisy:g}, "
                    f"wd {wd:g}: {found['both']} (the seeds' majority)")
    return criterion


def _mean(rows, column: str) -> float:
    """The mean of a column over the rows that have it (a model with every neuron dead has no IPR)."""
    values = [v for r in rows if (v := r[column]) is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _transformer_configs(rows, run=None):
    ipr = {name: _mean(_by(rows, run=name), "embed_ipr") for name in ("base", "layers-2", "heads-8", "tied")}
    if any(math.isnan(v) for v in ipr.values()):
        return False, "a configuration was not trained"
    ok = (abs(ipr["layers-2"] - ipr["base"]) <= 0.2 * ipr["base"] and ipr["heads-8"] > ipr["base"]
          and ipr["tied"] < ipr["base"])
    return ok, "mean embed_ipr over the seeds: " + ", ".join(f"{k} {v:.3f}" for k, v in ipr.items())


def _small_dropout_only(rows, run=None):
    small = [r for r in rows if 0 < r["dropout"] <= 0.1]
    none, large = _by(rows, dropout=0.0), [r for r in rows if r["dropout"] > 0.1]
    if not (small and none and large):
        return False, "dropout 0, up to 0.1 and above 0.1 are all needed"
    helped = [r for r in small if r.phase == "coexistence" and r["embed_ipr"] > _mean(none, "embed_ipr")]
    ok = bool(helped) and all(r["test_acc"] < 0.9 for r in large)
    return ok, "; ".join(f"dropout {r['dropout']:g}: {r.phase}, test {r['test_acc']:.2f}, embed_ipr {r['embed_ipr']:.3f}"
                         for r in sorted(rows, key=lambda r: r["dropout"]))


def _deep_dropout_cannot_memorise(rows, run=None):
    noisy = _by(rows, run="dropout", alpha=lambda a: a > 0.3, xi=lambda x: x >= 0.1)
    memorised = [r for r in noisy if r["train_acc"] >= 0.9]
    plain = [r for r in _by(rows, run="he", wd=0.0) if r["xi"] >= 0.1]  # the same network without dropout
    fits = [r for r in plain if r["train_acc"] >= 0.9]
    ok = bool(noisy) and not memorised and bool(plain) and len(fits) == len(plain)
    return ok, (f"{len(memorised)} of {len(noisy)} models with dropout 0.05 reach train accuracy 0.9 "
                f"({_phases(noisy)}); without dropout {len(fits)} of {len(plain)} do")


def _lazier_readout(rows, run=None):
    he, lazy = _by(rows, run="he"), _by(rows, run="lazy")
    if not he or not lazy:
        return False, "both parameterisations are needed"
    shift = abs(_mean(lazy, "mean_ipr") - _mean(he, "mean_ipr"))
    ok = shift <= 0.05 and _mean(lazy, "out_ipr") > _mean(he, "out_ipr")
    return ok, (f"input layer's mean IPR {_mean(he, 'mean_ipr'):.3f} (standard) against {_mean(lazy, 'mean_ipr'):.3f} "
                f"(lazier); readout's {_mean(he, 'out_ipr'):.3f} against {_mean(lazy, 'out_ipr'):.3f}")


def _deep_batchnorm(rows, run=None):
    bn = _by(rows, run="batchnorm")
    if not bn:
        return False, "no BatchNorm model"
    out, first = _mean(bn, "bn_out_ipr_correlation"), _mean(bn, "bn_ipr_correlation")
    ok = all(r.phase == "coexistence" for r in bn) and out >= 0.5 and first < out
    return ok, (f"{_phases(bn)}; rank correlation of |BatchNorm weight| with the readout's IPR {out:.2f}, with the "
                f"input layer's {first:.2f}")


def _input_layer_periodic(column: str):
    """Criterion: the input layer's mean IPR (models.csv `column`) of the generalising models is 0.1 or more above
    the memorising ones'."""
    def criterion(rows, run=None):
        mean = {}
        for name, phases in (("generalising", GENERALISING), ("memorising", ("memorization",))):
            values = [r[column] for r in rows if r.phase in phases]
            mean[name] = (sum(values) / len(values), len(values)) if values else None
        if None in mean.values():
            return False, "both generalising and memorising models are needed"
        (high, n_high), (low, n_low) = mean["generalising"], mean["memorising"]
        return high >= low + 0.1, (f"input layer's mean IPR {high:.2f} over {n_high} generalising models, {low:.2f} "
                                   f"over {n_low} memorising ones")
    return criterion


def _learns_the_periodic_solution(rows, run=None):
    r = rows[0]
    ok = r["test_acc"] >= 0.99 and r["mean_ipr"] >= 0.6 and r["analytic_similarity"] >= 0.6
    return ok, (f"test {r['test_acc']:.3f}, mean IPR {r['mean_ipr']:.2f}, similarity to the analytic neurons "
                f"{r['analytic_similarity']:.2f}")


def _analytic_exact_when_wide(rows, run=None):
    by_width = sorted((r["width"], r["test_acc"]) for r in rows)
    wide, narrow = by_width[-1], by_width[0]
    return wide[1] == 1.0 and narrow[1] < 0.9, (f"test accuracy {wide[1]:.3f} at N {wide[0]}, {narrow[1]:.3f} at N "
                                                f"{narrow[0]}")


def _width_needed(rows) -> dict[int, int | None]:
    """Each number of terms S: the smallest width whose analytic solution is right on 99% of all inputs."""
    return {S: min((r["width"] for r in rows if r["terms"] == S and r["all_acc"] >= 0.99), default=None)
            for S in sorted({r["terms"] for r in rows})}


def _width_grows_with_terms(rows, run=None):
    needed = _width_needed(rows)
    ladder = list(needed.values())
    ok = len(ladder) >= 2 and None not in ladder and all(b >= 3 * a for a, b in zip(ladder, ladder[1:]))
    return ok, "; ".join(f"S {S}: " + (f"N {n}" if n is not None else "none of the widths") for S, n in needed.items())


def _experts_exact(rows, run=None):
    exact = sum(r["acc"] == 1.0 for r in rows)
    mse = [r["mse"] for r in rows]
    return bool(rows) and exact == len(rows), (f"{exact} of {len(rows)} exact on all p^2 inputs; MSE {min(mse):.4f}-"
                                                f"{max(mse):.4f} (the paper's 0.0077-0.0102)" if rows else "none built")


def _learnable_iff_sum_form(rows, run=None):
    from fastgrok.analysis import generalised_at
    from fastgrok.polynomials import SURVEY

    listed = {op: predicted for op, (predicted, _) in SURVEY.items() if any(r["op"] == op for r in rows)}
    wrong = [op for op, predicted in listed.items()
             if bool(generalised_at([r for r in rows if r["op"] == op])) != (predicted == "learnable")]
    return bool(listed) and not wrong, (f"{len(listed) - len(wrong)} of {len(listed)} polynomials as predicted"
                                        + (f" (not: {', '.join(wrong)})" if wrong else ""))


def _learnable_in_every_architecture(rows, run=None):
    verdicts = {name: _learnable_iff_sum_form([r for r in rows if r["run"] == name])
                for name in sorted({r["run"] for r in rows})}
    return bool(verdicts) and all(ok for ok, _ in verdicts.values()), "; ".join(
        f"{name}: {numbers}" for name, (_, numbers) in verdicts.items())


# Figure, section and appendix numbers: To grok's arXiv v2 (2310.13061v2), the sequel's arXiv v1 (2406.03495v1).
CLAIMS = [
    Claim(TO_GROK, "Fig. 3a", "Without label noise the network fits its training set and generalises "
          "(coexistence), with weight decay or without.", "weight-decay",
          "every model at alpha 0.5, xi 0 and wd <= 5 is in coexistence", _coexistence_without_noise),
    Claim(TO_GROK, "Abstract (i), Fig. 1a", "A network can memorise corrupted labels and generalise at the same "
          "time (coexistence).", "weight-decay", "every model at alpha 0.5, wd 0 and xi 0.1-0.2 is in coexistence",
          _coexistence_with_noise),
    Claim(TO_GROK, "Fig. 3a", "Without regularisation a network trained on enough corrupted labels memorises them "
          "and does not generalise (memorization).", "weight-decay",
          "every model at alpha 0.5, wd 0 and xi >= 0.5 is in memorization", _memorization_without_regularisation),
    Claim(TO_GROK, "Fig. 1b, 3a", "Weight decay makes the network invert the corrupted labels: it learns their "
          "true value (partial or full inversion).", "weight-decay",
          "80% or more of the models at alpha 0.5, wd 5 and xi 0.15-0.3 are in partial or full inversion",
          _inversion_with_weight_decay),
    Claim(TO_GROK, "App. E", "Too much weight decay makes the network forget what it learned (forgetting).",
          "weight-decay", "more than half of the models at alpha 0.5 and wd 20 reach test accuracy 0.9 at a logged "
          "step and end below it", _forgetting_with_strong_weight_decay),
    Claim(TO_GROK, "Hypothesis 2.1, Fig. 4", "Generalising networks are made of periodic (high-IPR) neurons, "
          "memorising ones of low-IPR neurons.", "weight-decay", "mean neuron IPR of the coexistence and inversion "
          "models at least 0.3 above the memorisation models'", _ipr_separates_the_phases),
    Claim(TO_GROK, "Abstract (iv), Fig. 4", "Weight decay turns the network's neurons into generalising (periodic) "
          "ones.", "weight-decay", "at every alpha and xi <= 0.3 the wd 5 model's mean IPR exceeds the wd 0 model's",
          _raises_ipr("wd", 5.0)),
    Claim(TO_GROK, "Fig. 6", "Pruning the low-IPR (memorising) neurons lowers the accuracy on the corrupted data "
          "and keeps the network generalising.", "weight-decay",
          "every coexistence model at wd 0 with xi >= 0.1, half its neurons pruned low-IPR first, keeps test "
          "accuracy 0.9 and loses three quarters of its memorised accuracy", _pruning_removes_memorisation),
    Claim(TO_GROK, "Fig. 6", "Pruning the high-IPR neurons first destroys generalisation while the corrupted labels "
          "stay memorised.", "weight-decay", "every coexistence model at wd 0 with xi >= 0.1, 30% of its neurons "
          "pruned high-IPR first, falls below test accuracy 0.5 and keeps half its memorised accuracy (a random "
          "order's numbers beside, as a control)", _pruning_high_first_breaks_generalisation),
    Claim(TO_GROK, "App. I.1, Fig. 17a", "Pruned high-IPR first, a coexistence network keeps its corrupted labels "
          "longer than its uncorrupted ones.", "weight-decay", "every coexistence model at alpha 0.5, wd 0 and xi >= "
          "0.1, pruned high-IPR first, falls below accuracy 0.5 on its uncorrupted training data at a smaller pruned "
          "fraction than on its corrupted data", _memorisation_outlasts_generalisation),
    Claim(TO_GROK, "App. I.1, Fig. 17b", "In partial inversion, pruning the high-IPR neurons first lowers the test "
          "accuracy and raises the accuracy on the corrupted data: the memorising neurons take over.", "weight-decay",
          "every partial inversion model at alpha 0.5 and xi >= 0.1, pruned high-IPR first, gains 0.2 or more "
          "corrupted accuracy with its uncorrupted accuracy 0.9 or more, and is below test accuracy 0.5 with half its "
          "neurons pruned", _partial_inversion_remembers_when_pruned),
    Claim(TO_GROK, "App. I.1, Fig. 17c", "In full inversion, pruning the high-IPR neurons first hardly raises the "
          "accuracy on the corrupted data: few memorising neurons are left.", "weight-decay", "every full inversion "
          "model at alpha 0.5 and xi >= 0.1, pruned high-IPR first, gains at most 0.1 corrupted accuracy up to 80% "
          "pruned", _full_inversion_stays_inverted),
    Claim(TO_GROK, "App. I.2", "Memorising and generalising neurons both lower the train loss: it rises monotonically "
          "as neurons are pruned, in either order.", "weight-decay", "rank correlation of train loss and pruned "
          "fraction 0.9 or more in every pruned model, low- and high-IPR first", _train_loss_monotonic),
    Claim(TO_GROK, "App. I.2", "The periodic neurons lower the test loss: pruning them first raises it.",
          "weight-decay", "every coexistence model at alpha 0.5 and xi >= 0.1 has a higher test loss with 30% of its "
          "neurons pruned high-IPR first", _periodic_neurons_lower_the_test_loss),
    Claim(TO_GROK, "App. I.2", "Without weight decay the low-IPR neurons also cancel the analytic solution's "
          "sub-leading terms: pruning them raises the test loss while the test accuracy holds.", "weight-decay",
          "every coexistence model at alpha 0.5, wd 0 and xi >= 0.1, 10% of its neurons pruned low-IPR first, keeps "
          "its test accuracy within 0.1 and has a higher test loss", _low_ipr_neurons_cancel),
    Claim(TO_GROK, "Fig. 2", "As the network groks clean data its neurons become periodic: the mean IPR rises with "
          "the test accuracy.", "dynamics", "the xi 0, wd 5 model's mean IPR goes from below 0.2 to above 0.6, test "
          "accuracy ends at 0.9 or more, and IPR and test accuracy correlate 0.8 or more over the logged steps",
          _ipr_rises_with_grokking),
    Claim(TO_GROK, "Abstract, Fig. 1", "With regularisation training has two stages: the network first groks, "
          "reaching high train and test accuracy, then unlearns the corrupted labels and its train accuracy falls "
          "towards 100(1 - xi)%.", "dynamics", "every model with weight decay that ends in partial or full inversion "
          "was at train and test accuracy 0.9 at one logged step and ends below train accuracy 0.9", _two_stages),
    Claim(TO_GROK, "Abstract (iv), Fig. 4", "Dropout, like weight decay, turns the neurons into generalising "
          "(periodic) ones.", "dropout", "at every alpha and xi <= 0.3 the dropout 0.3 model's mean IPR exceeds "
          "the dropout 0 model's", _raises_ipr("dropout", 0.3)),
    Claim(TO_GROK, "Abstract (iii), Fig. 3", "Dropout makes the network ignore the corrupted labels: it inverts "
          "them.", "dropout", "half or more of the models at alpha 0.5, dropout >= 0.3 and xi 0.15-0.3 are in "
          "partial or full inversion", _dropout_inverts),
    Claim(TO_GROK, "Abstract (iv), Fig. 5", "BatchNorm de-amplifies the memorising neurons: its weights grow with "
          "the neurons' IPR.", "batchnorm", "rank correlation of neuron IPR and |BatchNorm weight| 0.5 or more in "
          "every BatchNorm model trained on corrupted labels", _bn_weights_track_ipr),
    Claim(TO_GROK, "Fig. 5", "Unlike weight decay and dropout, BatchNorm leaves the IPR distribution nearly as it "
          "is: the low-IPR neurons stay.", "batchnorm", "mean IPR with BatchNorm within 0.1 of the same training "
          "without it, in every cell", _bn_keeps_ipr),
    Claim(TO_GROK, "Abstract (iii), Fig. 5", "BatchNorm makes the network ignore the corrupted labels.",
          "batchnorm", "at alpha 0.65, xi 0.2 (Fig. 5's model) the BatchNorm model inverts, and recalls fewer "
          "corrupted labels than the same training without BatchNorm", _bn_ignores_corruption),
    Claim(TO_GROK, "App. O", "A wider network memorises more: without regularisation fewer models generalise at "
          "N 5000 than at N 500.", "width", "the share of models in coexistence or inversion is lower at the largest "
          "width than at the smallest", _wider_memorises),
    Claim(TO_GROK, "App. P", "Multiplication has almost the same phase diagram as addition.", "mul-diagram",
          "the same phase as addition's (weight-decay) in 80% or more of the cells both trained",
          _same_phases_for_mul, also=("weight-decay",)),
    Claim(TO_GROK, "App. M", "With the cross-entropy loss there is no forgetting: too much weight decay leaves the "
          "network unable to generalise (confusion).", "cross-entropy", "no model reaches test accuracy 0.9 and "
          "then ends below it, and some model at the strongest weight decay never reaches it", _no_forgetting),
    Claim(TO_GROK, "App. N", "A ReLU network shows no forgetting either.", "relu", "no model reaches test accuracy "
          "0.9 and then ends below it, and some model at the strongest weight decay never reaches it",
          _no_forgetting),
    Claim(TO_GROK, "App. Q, Fig. 32", "The neurons a generalising network needs, once its memorising neurons are "
          "pruned, grow sub-linearly with its width.", "prune-width", "the neurons needed (width less the most "
          "pruned low-IPR first with test accuracy 0.9 kept) fitted as N^k over the widths: k below 1",
          _needed_grows_sublinearly),
    Claim(TO_GROK, "Fig. 7a", "A transformer shows the MLP's phases: memorisation of corrupted labels without "
          "regularisation, inversion with weight decay.", "transformer",
          "at alpha 0.5 (--quick: its one alpha), clean data at the strongest weight decay: coexistence; xi 0.15 "
          "without: memorization; with: partial or full inversion", _same_phases_as_the_mlp(0.15)),
    Claim(TO_GROK, "Hypothesis 2.2, Fig. 7a", "A transformer that generalises has periodic embeddings, as the MLP "
          "has periodic input weights.", "transformer", "the embeddings' mean IPR (embed_ipr) 0.1 or more higher in "
          "the generalising models than in the memorising ones", _input_layer_periodic("embed_ipr")),
    Claim(TO_GROK, "Fig. 7b", "A deeper ReLU MLP shows the same phases.", "deep-mlp",
          "at alpha 0.5 (--quick: its one alpha), clean data at the strongest weight decay: coexistence; xi 0.2 "
          "without: memorization; with: partial or full inversion", _same_phases_as_the_mlp(0.2)),
    Claim(TO_GROK, "Hypothesis 2.2, Fig. 7b", "A deeper MLP that generalises has a periodic first layer.", "deep-mlp",
          "the first layer's mean neuron IPR 0.1 or more higher in the generalising models than in the memorising "
          "ones", _input_layer_periodic("mean_ipr")),
    Claim(TO_GROK, "App. G.1, Fig. 12", "A transformer's embeddings are periodic in every configuration: depth does "
          "not change their IPR, more heads raise it and weight tying lowers it.", "transformer-configs",
          "mean embed_ipr over the seeds: 2 blocks within 20% of 1 block's, 8 heads above 4 heads', tied below "
          "untied", _transformer_configs),
    Claim(TO_GROK, "App. G.2, Fig. 13", "A small dropout gives a transformer coexistence with more periodic "
          "embeddings; dropout above 0.1 does not help.", "transformer-dropout", "a model with dropout in (0, 0.1] "
          "is in coexistence with embed_ipr above the dropout-0 model's, and every model with dropout above 0.1 is "
          "below test accuracy 0.9", _small_dropout_only),
    Claim(TO_GROK, "App. G", "A 3-layer ReLU MLP with even 0.05 dropout fails to memorise the data for alpha > 0.3 "
          "and xi >= 0.1.", "deep-mlp-configs", "no dropout-0.05 model at alpha > 0.3 and xi >= 0.1 reaches train "
          "accuracy 0.9, where every one without dropout or weight decay (the standard run) does",
          _deep_dropout_cannot_memorise),
    Claim(TO_GROK, "App. G.3, Fig. 14", "In a lazier parameterisation the input layer's IPR barely shifts while the "
          "output layer's grows.", "deep-mlp-configs", "mean input-layer IPR within 0.05 of the standard "
          "parameterisation's, readout IPR (out_ipr) higher", _lazier_readout),
    Claim(TO_GROK, "App. G.4, Fig. 15", "With BatchNorm a 3-layer MLP stays in coexistence, and its BatchNorm weights "
          "track the IPR of the output layer's weights, not of the input layer's.", "deep-mlp-configs",
          "every BatchNorm model in coexistence; rank correlation of the last BatchNorm's |weight| with the "
          "readout's IPR 0.5 or more, and above the first BatchNorm's with the input layer's", _deep_batchnorm),
    Claim(TO_GROK, "Eq. 2 (Gromov 2023)", "The analytic solution of modular addition is exact once the network is "
          "wide enough.", "analytic-width", "test accuracy 1 at the largest width, below 0.9 at the smallest",
          _analytic_exact_when_wide),
    Claim(POLYNOMIALS, "Fig. 1, eq. 2", "The analytic solution of a sum of S terms is exact once the network is wide "
          "enough, and the width it needs grows exponentially with S.", "analytic-terms",
          "the smallest width right on 99% of all p^S inputs exists for every S and grows 3-fold or more per "
          "added term", _width_grows_with_terms),
    Claim(POLYNOMIALS, "Fig. 3, eq. 6-8", "A network trained on multiplication generalises with neurons periodic "
          "in the discrete logarithm of the residues, like the analytic solution.", "mul",
          "test accuracy 0.99, mean IPR (log basis) and similarity to the analytic neurons 0.6 or more",
          _learns_the_periodic_solution),
    Claim(POLYNOMIALS, "Fig. 2, eq. 2-4", "A network trained on a sum of four terms groks, with periodic neurons "
          "like the analytic solution's.", "sum4",
          "test accuracy 0.99, mean IPR and similarity to the analytic neurons 0.6 or more",
          _learns_the_periodic_solution),
    Claim(POLYNOMIALS, "Sec. 4, App. B", "Multiplication experts for the monomials, a softmax and an addition "
          "expert make a network exact on polynomials that no network learns by training.", "experts",
          "accuracy 1 on all p^2 inputs for each of App. B's three polynomials at p 97 and 23", _experts_exact),
    Claim(POLYNOMIALS, "Hypothesis 5.1, App. C", "A network generalises on a polynomial exactly when it has the form "
          "h(g1(x) + g2(y)).", "learnability",
          "a polynomial has a majority of seeds at test accuracy 0.9 at some alpha exactly when it is predicted "
          "learnable (`fastgrok learnability`)", _learnable_iff_sum_form),
    Claim(POLYNOMIALS, "Hypothesis 5.2", "Other architectures generalise on the same polynomials: a transformer and "
          "a deeper MLP learn exactly those of the form h(g1(x) + g2(y)).", "learnability-deep",
          "in each architecture's run, a polynomial has a majority of seeds at test accuracy 0.9 at some alpha "
          "exactly when it is predicted learnable", _learnable_in_every_architecture),
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


def _runs(name: str, out: Path, quick: bool) -> list[tuple[Path, dict]]:
    """The run directories of an experiment and each one's spec: DIR/name; DIR/name/RUN for each of a spec's
    "runs"; for an analytic solution at several numbers of terms (widths given per S) DIR/name/terms-S."""
    exp = EXPERIMENTS[name]
    spec = exp.quick if quick else exp.full
    if exp.kind == "analytic" and isinstance(spec["widths"], dict):
        return [(out / name / f"terms-{S}", {**spec, "terms": S, "widths": widths})
                for S, widths in spec["widths"].items()]
    if "runs" in spec:
        return [(out / name / run, {"axes": {**spec.get("axes", {}), **differ.get("axes", {})},
                                    "settings": {**spec.get("settings", {}), **differ.get("settings", {})}})
                for run, differ in spec["runs"].items()]
    return [(out / name, spec)]


def _complete(run: Path) -> bool:
    from fastgrok.results import read_config

    return (run / "config.json").exists() and read_config(run)["status"] == "complete"


def planned_steps(names: list[str], out: Path, quick: bool, device: str = "auto") -> int:
    """The model-steps the experiments not yet complete in `out` train (an interrupted one counted whole)."""
    return sum(t["model_steps"] for t in plan_experiments(names, out, quick, device, estimate=False))


def plan_experiments(names: list[str], out: Path, quick: bool, device: str = "auto",
                     estimate: bool = True) -> list[dict]:
    """What each experiment not yet complete in `out` would train: its runs, models and model-steps, and with
    `estimate` the time the planner gives them on this device from a few measured steps (`fastgrok train
    --dry-run`'s)."""
    from fastgrok import train as training

    table = []
    for name in names:
        runs = [(run, spec) for run, spec in _runs(name, out, quick) if not _complete(run)]
        models = steps = seconds = 0
        for run, spec in runs if EXPERIMENTS[name].kind == "train" else ():
            grid, settings = _grid(spec, device)
            models += len(grid)
            steps += len(grid) * settings.steps
            seconds += training.plan(grid, settings, device=device).seconds if estimate else 0.0
        table.append({"experiment": name, "runs": len(runs), "models": models, "model_steps": steps,
                      "seconds": seconds})
    return table


def run_experiment(name: str, out: Path, quick: bool, device: str = "auto",
                   on_step: Callable[[int, int], None] | None = None) -> str:
    """Train (or resume, or skip when complete) one experiment's runs, then draw its figures; returns what was
    done: 'trained', 'resumed' or 'kept'. on_step: as train's."""
    from fastgrok import analysis
    from fastgrok import train as training
    from fastgrok.analytic import analytic_run

    exp, done = EXPERIMENTS[name], "kept"
    runs = _runs(name, out, quick)
    for run, spec in runs:
        if exp.kind == "experts":
            if not (run / "experts.csv").exists():
                _build_experts(run, spec, device)
                done = "trained"
        elif exp.kind == "analytic":
            if not (run / "config.json").exists():
                analytic_run(run, p=spec["p"], widths=spec["widths"], terms=spec.get("terms", 2),
                             device="cpu" if device == "auto" else device)
                done = "trained"
        elif not (run / "config.json").exists():
            grid, settings = _grid(spec, device)
            training.train(grid, settings, run, device=device, on_step=on_step)
            done = "trained"
        elif not _complete(run):
            training.resume(run, device=device, on_step=on_step)
            done = "resumed"
    if len(runs) > 1 and exp.kind == "analytic":  # one figure over the numbers of terms
        from fastgrok.plots import accuracy_vs_width

        rows = experiment_rows(name, out, quick)
        curves = {f"S = {S}": ([r["width"] for r in rows if r["terms"] == S], [r["all_acc"] for r in rows
                                                                              if r["terms"] == S])
                  for S in sorted({r["terms"] for r in rows})}
        accuracy_vs_width(curves, out / name / "accuracy-vs-width.png",
                          f"analytic solution of S-term addition, p {runs[0][1]['p']}")
    for analysis_name in exp.analyses:
        if (draw := ANALYSES[analysis_name][1]) is not None:
            for run, _ in runs:
                draw(analysis, run)
    return done


def _build_experts(run: Path, spec: dict, device: str) -> None:
    """experts.csv: the construction's accuracy and MSE for each polynomial and p of the spec."""
    from fastgrok.analytic import experts
    from fastgrok.results import write_csv

    rows = [["op", "p", "monomials", "acc", "mse"]]
    for op in spec["ops"]:
        for p in spec["p"]:
            result = experts(op, p, spec["widths"])
            rows.append([op, p, len(result["monomials"]), f"{result['acc']:.6g}", f"{result['mse']:.6g}"])
    run.mkdir(parents=True, exist_ok=True)
    write_csv(run / "experts.csv", rows)


def experiment_rows(name: str, out: Path, quick: bool) -> list | None:
    """The models.csv rows of an experiment's runs, or None while one of them is not complete. Each row also has
    its run's name (`run`: the folder in DIR/name, or None) and number of terms (`terms`)."""
    from fastgrok.results import read_config, read_models

    if EXPERIMENTS[name].kind == "experts":
        import csv

        if not (out / name / "experts.csv").exists():
            return None
        with open(out / name / "experts.csv", newline="") as f:
            return [{**r, "p": int(r["p"]), "acc": float(r["acc"]), "mse": float(r["mse"])} for r in csv.DictReader(f)]
    rows = []
    for run, _ in _runs(name, out, quick):
        if not _complete(run):
            return None
        terms = read_config(run)["settings"].get("terms", 2)
        for row in read_models(run):
            row.extra.update(run=run.name if run != out / name else None, terms=terms, experiment=name)
            rows.append(row)
    return rows


def verdicts(out: Path, names: list[str], quick: bool) -> list[dict]:
    """Each claim whose experiment is among `names` and complete in `out`: its verdict and numbers."""
    table, read = [], {}  # read: each experiment's rows, read once for all its claims
    for claim in CLAIMS:
        if claim.experiment not in names:
            continue
        for name in (claim.experiment, *claim.also):
            if name not in read:
                read[name] = experiment_rows(name, out, quick)
        found = {name: read[name] for name in (claim.experiment, *claim.also)}
        missing = [name for name, rows in found.items() if rows is None]
        if missing:
            table.append({"claim": claim, "verdict": "not run",
                          "numbers": f"{', '.join(missing)} has not finished (--only {','.join(missing)})"})
            continue
        rows = [row for name, rows in found.items() for row in rows]
        try:
            holds, numbers = claim.criterion(rows, out / claim.experiment)
        except (KeyError, AttributeError) as e:  # a column an analysis adds (mean_ipr) is missing
            table.append({"claim": claim, "verdict": "not run", "numbers": f"the run has no {e}"})
            continue
        table.append({"claim": claim, "verdict": "holds" if holds else "differs", "numbers": numbers})
    return table


def write_report(out: Path, names: list[str], quick: bool, ran: str = "",
                 took: dict[str, float] | None = None) -> tuple[Path, Path]:
    """DIR/report.md (figures linked) and DIR/report.html (figures inlined): per claim the statement with its
    source, the criterion, the verdict with its numbers, and the experiment's figure. `ran`: where and how long;
    `took`: the seconds this call spent on each experiment it trained or resumed (training and analyses)."""
    table = verdicts(out, names, quick)
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
        lines += [f"## {name}", "", exp.about + (f" (this call: {took[name]:.0f} s)" if name in (took or {}) else ""),
                  ""]
        runs = [out / name] if exp.kind == "analytic" else [run for run, _ in _runs(name, out, quick)]
        for analysis in exp.analyses:
            for run in runs:
                for figure in sorted(run.glob(ANALYSES[analysis][0])):
                    where = figure.relative_to(out).as_posix()
                    lines += [f"![{where.removesuffix('.png')}]({where})", ""]
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
    began, took = time.perf_counter(), {}
    try:
        for name in names:
            start = time.perf_counter()
            done = run_experiment(name, out, quick, device, on_step)
            if done != "kept":
                took[name] = time.perf_counter() - start
            if on_experiment is not None:
                on_experiment(name, done if done == "kept" else f"{done} in {took[name]:.0f} s")
    finally:
        ran = (f"On {device_name(resolve_device(device))}, fastgrok {__version__}: {time.perf_counter() - began:.0f} s "
               f"for this call, which trained or resumed {len(took)} of the {len(names)} experiments.")
        report = write_report(out, names, quick, ran, took)
    return report
