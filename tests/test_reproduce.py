"""`fastgrok reproduce`: each claim's criterion on synthetic models.csv rows (a table where it holds and one where
it does not), two small experiments end to end (runs, report.md and report.html, verdicts), and the resume of an
interrupted reproduction."""

import pytest
from typer.testing import CliRunner

from fastgrok import reproduce
from fastgrok.cli import app
from fastgrok.config import Hyper
from fastgrok.polynomials import SURVEY
from fastgrok.results import ModelRow

runner = CliRunner()


def row(phase="coexistence", test_acc=1.0, model=0, extra=None, corrupted_acc=0.9, test90_step=None, **hyper):
    return ModelRow(model, Hyper(**hyper), {"test_acc": test_acc, "corrupted_acc": corrupted_acc}, phase, False, 100,
                    None, test90_step, extra or {})


def diagram(phase_at=None):
    """weight-decay rows at alpha 0.5: phase_at maps (wd, xi) to a phase; every other cell as the paper's Fig. 3a
    row: forgetting at wd 20, memorization from xi 0.3 at wd 0, full inversion at wd 5 and xi 0.15-0.3,
    coexistence elsewhere."""
    rows = []
    for wd in (0.0, 5.0, 15.0, 20.0):
        for xi in (0.0, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6):
            default = ("forgetting" if wd == 20 else "memorization" if xi >= 0.3 and wd == 0 else
                       "full_inversion" if wd == 5 and 0.15 <= xi <= 0.3 else "coexistence")
            rows.append(row((phase_at or {}).get((wd, xi), default), xi=xi, wd=wd, test90_step=100))
    return rows


def claim(experiment, where_word):
    return next(c for c in reproduce.CLAIMS if c.experiment == experiment and where_word in c.criterion_text)


@pytest.mark.parametrize("word, failing", [
    ("xi 0 and wd <= 5", {(0.0, 0.0): "memorization"}),
    ("wd 0 and xi 0.1-0.2", {(0.0, 0.15): "memorization"}),
    ("wd 0 and xi >= 0.5", {(0.0, 0.5): "coexistence"}),
    ("wd 5 and xi 0.15-0.3", {(5.0, 0.15): "coexistence", (5.0, 0.2): "memorization"}),
    ("wd 20 reach test accuracy 0.9", {(20.0, xi): "memorization" for xi in (0.0, 0.1, 0.15, 0.2)}),
])
def test_each_phase_claim_holds_on_the_papers_diagram_and_not_when_a_cell_moves(word, failing):
    c = claim("weight-decay", word)
    assert c.criterion(diagram())[0] is True
    holds, numbers = c.criterion(diagram(failing))
    assert holds is False and "models" in numbers


def test_forgetting_is_told_from_confusion_by_the_first_step_at_test_90():
    """A model that never generalised (no logged step at test 0.9) is in confusion, not forgetting."""
    forgetting = claim("weight-decay", "wd 20 reach test accuracy 0.9")
    confused = [row(r.phase, xi=r["xi"], wd=r["wd"]) for r in diagram()]  # no test90_step anywhere
    holds, numbers = forgetting.criterion(confused)
    assert holds is False and "0 of 8 models at wd 20 generalised then forgot, 8 never generalised" in numbers
    for experiment in ("cross-entropy", "relu"):
        none = claim(experiment, "never reaches it")
        assert none.criterion(confused)[0] is True and none.criterion(diagram())[0] is False
        assert none.criterion([r for r in confused if r.phase != "forgetting"])[0] is False  # no strong wd probed


def test_the_multiplication_diagram_is_compared_cell_by_cell_with_addition():
    c = claim("mul-diagram", "80% or more of the cells")
    add = [row(r.phase, xi=r["xi"], wd=r["wd"], extra={"experiment": "weight-decay"}) for r in diagram()]
    mul = [row(r.phase, xi=r["xi"], wd=r["wd"], extra={"experiment": "mul-diagram"}) for r in diagram()
           if r["xi"] in (0.0, 0.2, 0.4, 0.6) and r["wd"] != 15.0]
    assert c.criterion(add + mul)[0] is True
    moved = [row("memorization" if r["wd"] == 5.0 else r.phase, xi=r["xi"], wd=r["wd"], extra=r.extra) for r in mul]
    holds, numbers = c.criterion(add + moved)
    assert holds is False and "the same phase in 8 of 12 cells" in numbers  # wd 5: 4 cells moved
    assert c.criterion(mul)[0] is False  # nothing of addition's to compare with


def test_the_phase_claims_read_the_row_alpha_half_of_a_full_diagram():
    """A full diagram has every alpha; the claims read its alpha 0.5 row (where --quick trains)."""
    c = claim("weight-decay", "wd 0 and xi >= 0.5")
    starved = [row("forgetting", xi=r["xi"], wd=r["wd"], alpha=0.1) for r in diagram()]
    assert c.criterion(diagram() + starved)[0] is True
    assert c.criterion(starved)[0] is False  # no alpha 0.5 row: nothing to decide on


def test_the_analytic_claims_want_the_widest_exact_and_the_width_to_grow_with_the_terms():
    c = claim("analytic-width", "largest width")
    assert c.criterion([row(test_acc=0.3, width=10), row(test_acc=1.0, width=500)])[0] is True
    assert c.criterion([row(test_acc=0.3, width=10), row(test_acc=0.99, width=500)])[0] is False
    assert c.criterion([row(test_acc=0.95, width=10), row(test_acc=1.0, width=500)])[0] is False
    terms = claim("analytic-terms", "3-fold")
    rows = lambda needed: [row(width=w, extra={"terms": S, "all_acc": 1.0 if w >= n else 0.5})  # noqa: E731
                           for S, n in needed.items() for w in (10, 100, 1000, 10000)]
    assert terms.criterion(rows({2: 100, 3: 1000})) == (True, "S 2: N 100; S 3: N 1000")
    assert terms.criterion(rows({2: 100, 3: 100}))[0] is False  # no growth
    assert terms.criterion(rows({2: 100, 3: 10**6}))[0] is False  # S 3 never exact


def test_the_learnability_claim_compares_each_polynomial_with_its_predicted_class():
    c = claim("learnability", "predicted")
    good = [row(test_acc=1.0 if predicted == "learnable" else 0.1, op=op, alpha=a, seed=s)
            for op, (predicted, _) in SURVEY.items() for a in (0.3, 0.5) for s in (0, 1)]
    assert c.criterion(good) == (True, f"{len(SURVEY)} of {len(SURVEY)} polynomials as predicted")
    bad = [row(test_acc=1.0 if r["op"] == "x^2+xy" else r["test_acc"], op=r["op"], alpha=r["alpha"], seed=r["seed"])
           for r in good]
    holds, numbers = c.criterion(bad)
    assert holds is False and "(not: x^2+xy)" in numbers


def test_the_ipr_claims_want_generalising_models_periodic_and_regularisers_to_raise_ipr():
    separates, raises = claim("weight-decay", "0.3 above"), claim("weight-decay", "wd 5 model's mean IPR")
    rows = [row("coexistence", xi=0.1, wd=5.0, extra={"mean_ipr": 0.8}),
            row("memorization", xi=0.1, wd=0.0, extra={"mean_ipr": 0.2})]
    assert separates.criterion(rows)[0] is True and raises.criterion(rows)[0] is True
    rows[1] = row("memorization", xi=0.1, wd=0.0, extra={"mean_ipr": 0.85})
    assert separates.criterion(rows)[0] is False and raises.criterion(rows)[0] is False
    dropout = claim("dropout", "dropout 0.3 model's mean IPR")
    rows = [row(xi=xi, dropout=d, extra={"mean_ipr": 0.5 + d + xi}) for xi in (0.0, 0.2) for d in (0.0, 0.3)]
    assert dropout.criterion(rows)[0] is True
    rows[-1] = row(xi=0.2, dropout=0.3, extra={"mean_ipr": 0.6})  # below dropout 0's 0.7 at xi 0.2
    assert dropout.criterion(rows)[0] is False


def test_the_pruning_claims_read_the_pruning_curves(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    low, high = claim("weight-decay", "pruned low-IPR first"), claim("weight-decay", "high-IPR first")
    rows = [row("coexistence", model=3, xi=0.2, wd=0.0)]

    def curves(order, corrupted, test):
        pq.write_table(pa.table({"model": [3, 3, 3], "fraction": [0.0, 0.3, 0.5], "corrupted_acc": [0.8, *corrupted],
                                 "test_acc": [0.95, *test]}), tmp_path / f"prune-{order}.parquet")
    for corrupted, holds in ((0.05, True), (0.5, False)):
        curves("low", (0.4, corrupted), (0.96, 0.96))
        assert low.criterion(rows, tmp_path)[0] is holds
    for test, holds in ((0.1, True), (0.7, False)):
        curves("high", (0.7, 0.6), (test, 0.0))
        assert high.criterion(rows, tmp_path)[0] is holds
    curves("random", (0.5, 0.3), (0.9, 0.8))
    assert "in a random order they keep test 0.90 and memorised 0.50" in high.criterion(rows, tmp_path)[1]
    assert low.criterion(rows, None)[0] is False and high.criterion(rows, None)[0] is False  # never pruned


def test_the_appendix_i_claims_read_each_phases_pruning_curves(tmp_path):
    """Fig. 17 and App. I.2: each claim on a pruning curve where it holds and one where it does not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fractions = [0.0, 0.1, 0.3, 0.5, 0.8, 1.0]

    def curves(order, **metrics):  # model 0 coexistence at wd 0, 1 partial inversion, 2 full inversion (wd 5)
        table = {"model": [], "fraction": fractions * 3}
        for m in range(3):
            table["model"] += [m] * len(fractions)
        for name, values in metrics.items():
            table[name] = [v for m in range(3) for v in values[m]]
        pq.write_table(pa.table(table), tmp_path / f"prune-{order}.parquet")
    rows = [row("coexistence", model=0, xi=0.3, wd=0.0), row("partial_inversion", model=1, xi=0.3, wd=5.0),
            row("full_inversion", model=2, xi=0.3, wd=5.0)]
    rising = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    outlasts, partial, full, train_loss, periodic, cancel = (
        claim("weight-decay", words) for words in ("uncorrupted training data at a smaller", "gains 0.2 or more",
                                                    "gains at most 0.1", "train loss and pruned", "30% of its",
                                                    "10% of its neurons pruned low-IPR"))
    high = dict(clean_acc=[[1, 1, 0.4, 0.1, 0, 0], [1, 1, 0.95, 0.6, 0.2, 0], [1, 1, 0.95, 0.5, 0.2, 0]],
                corrupted_acc=[[0.9, 0.9, 0.8, 0.6, 0.2, 0], [0.3, 0.4, 0.6, 0.5, 0.2, 0], [0.0, 0.02, 0.05, 0.08, 0.1, 0.2]],
                test_acc=[[1, 0.9, 0.3, 0.1, 0, 0], [1, 1, 0.8, 0.3, 0, 0], [1, 1, 0.8, 0.3, 0, 0]],
                train_loss=[rising] * 3, test_loss=[rising] * 3)
    low = dict(high, test_acc=[[1, 0.98, 0.9, 0.9, 0.5, 0]] * 3, test_loss=[rising] * 3)
    curves("high", **high)
    curves("low", **low)
    for c in (outlasts, partial, full, train_loss, periodic, cancel):
        assert c.criterion(rows, tmp_path)[0] is True, c.statement
        assert c.criterion(rows, None)[0] is False  # never pruned
    curves("high", **dict(high, clean_acc=[[1, 1, 1, 1, 1, 0]] * 3,  # generalisation outlasts memorisation
                          corrupted_acc=[[0.9, 0.9, 0.3, 0.1, 0, 0], [0.3] * 6, [0.0, 0.1, 0.3, 0.3, 0.3, 0.3]],
                          train_loss=[rising[::-1]] * 3, test_loss=[rising[::-1]] * 3))
    for c in (outlasts, partial, full, train_loss, periodic):
        assert c.criterion(rows, tmp_path)[0] is False, c.statement
    curves("low", **dict(low, test_loss=[rising[::-1]] * 3))  # the loss falls: nothing cancelled
    assert cancel.criterion(rows, tmp_path)[0] is False


def test_the_appendix_g_claims_compare_the_configurations():
    configs = claim("transformer-configs", "8 heads")
    ipr = {"base": 0.3, "layers-2": 0.32, "heads-8": 0.4, "tied": 0.2}
    rows = [row(extra={"run": name, "embed_ipr": v}, seed=s) for name, v in ipr.items() for s in (0, 1)]
    assert configs.criterion(rows)[0] is True
    for name, moved in (("layers-2", 0.5), ("heads-8", 0.25), ("tied", 0.35)):
        assert configs.criterion([row(extra={"run": n, "embed_ipr": moved if n == name else v}) for n, v in ipr.items()])[0] is False

    dropout = claim("transformer-dropout", "(0, 0.1]")
    cases = {0.0: ("memorization", 0.3, 0.10), 0.05: ("coexistence", 0.95, 0.2), 0.3: ("forgetting", 0.2, 0.1)}
    rows = lambda cases: [row(phase, test_acc, dropout=d, extra={"embed_ipr": e}) for d, (phase, test_acc, e) in cases.items()]  # noqa: E731
    assert dropout.criterion(rows(cases))[0] is True
    assert dropout.criterion(rows({**cases, 0.3: ("coexistence", 0.95, 0.2)}))[0] is False  # larger dropout helps
    assert dropout.criterion(rows({**cases, 0.05: ("coexistence", 0.95, 0.05)}))[0] is False  # no higher IPR

    memorise = claim("deep-mlp-configs", "dropout-0.05")
    model = lambda run, train_acc, **hyper: ModelRow(0, Hyper(**{"alpha": 0.6, "xi": 0.2, **hyper}), {"train_acc": train_acc},  # noqa: E731
                                                     "", False, 100, None, None, {"run": run})
    rows = [model("dropout", 0.8, dropout=0.05), model("he", 1.0)]
    assert memorise.criterion(rows)[0] is True
    assert memorise.criterion([*rows, model("dropout", 1.0, dropout=0.05, xi=0.1)])[0] is False  # one memorises
    assert memorise.criterion([rows[0], model("he", 0.8)])[0] is False  # nor does it without dropout: no evidence

    lazy = claim("deep-mlp-configs", "out_ipr")
    parts = lambda shift, out: [row(extra={"run": "he", "mean_ipr": 0.5, "out_ipr": 0.2}),  # noqa: E731
                                row(extra={"run": "lazy", "mean_ipr": 0.5 + shift, "out_ipr": out})]
    assert lazy.criterion(parts(0.02, 0.4))[0] is True
    assert lazy.criterion(parts(0.2, 0.4))[0] is False and lazy.criterion(parts(0.02, 0.1))[0] is False
    dead = [*parts(0.02, 0.4), row(extra={"run": "lazy", "mean_ipr": float("nan"), "out_ipr": float("nan")})]
    assert lazy.criterion(dead)[0] is True  # a model with every neuron dead has no IPR to average

    bn = claim("deep-mlp-configs", "last BatchNorm")
    model = lambda phase, out, first: [row(phase, extra={"run": "batchnorm", "bn_out_ipr_correlation": out,  # noqa: E731
                                                         "bn_ipr_correlation": first})]
    assert bn.criterion(model("coexistence", 0.7, 0.1))[0] is True
    for failing in (model("full_inversion", 0.7, 0.1), model("coexistence", 0.3, 0.1), model("coexistence", 0.7, 0.8)):
        assert bn.criterion(failing)[0] is False


def test_the_pruning_width_claim_counts_the_neurons_each_generalising_model_needs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = claim("prune-width", "N^k")
    rows = [row(model=m, width=w) for m, w in enumerate((100, 1000))]
    rows.append(row("memorization", model=2, width=1000))

    def needing(small, large):  # test accuracy 1 until all but `needed` neurons are pruned, then 0
        table = {"model": [], "pruned": [], "test_acc": []}
        for m, (width, needed) in enumerate(((100, small), (1000, large), (1000, 0))):
            for pruned in range(0, width + 1, 10):
                table["model"].append(m)
                table["pruned"].append(pruned)
                table["test_acc"].append(0.2 if m == 2 else 1.0 if width - pruned >= needed else 0.0)
        pq.write_table(pa.table(table), tmp_path / "prune-low.parquet")
    needing(40, 80)
    assert c.criterion(rows, tmp_path) == (True, "N 100: 40, N 1000: 80 neurons needed (mean over the generalising "
                                                 "seeds); exponent 0.30")  # the memorising model is left out
    needing(40, 800)
    assert c.criterion(rows, tmp_path)[0] is False  # 20 times the neurons for 10 times the width
    assert c.criterion(rows, None)[0] is False


def test_the_dynamics_claims_read_each_models_history(monkeypatch):
    ipr, stages = claim("dynamics", "correlate"), claim("dynamics", "logged step")
    steps = list(range(0, 200, 10))
    grok = {"step": steps, "test_acc": [min(1.0, s / 100) for s in steps], "ipr": [0.05 + 0.009 * min(s, 100) for s in steps],
            "train_acc": [1.0] * len(steps)}
    # memorise, grok with the corrupted labels still recalled, then unlearn them: train 1 -> 0.8 (xi 0.2)
    two = {"step": steps, "train_acc": [1.0] * 8 + [0.8] * 12, "test_acc": [0.2] * 5 + [1.0] * 15, "ipr": [0.5] * 20}
    # inverts without ever fitting the corrupted labels: no first stage
    one = {**two, "train_acc": [0.8] * 20}
    histories = {0: grok, 1: two}
    monkeypatch.setattr(reproduce, "_histories", lambda run, models: {m: histories[m] for m in models})
    rows = [row("coexistence", model=0, xi=0.0, wd=5.0), row("full_inversion", model=1, xi=0.2, wd=5.0),
            row("memorization", model=2, xi=0.2, wd=0.0)]
    assert ipr.criterion(rows, "run")[0] is True and stages.criterion(rows, "run")[0] is True
    histories[0] = {**grok, "ipr": [0.05] * len(steps)}  # grokked without periodic neurons
    histories[1] = one
    assert ipr.criterion(rows, "run")[0] is False and stages.criterion(rows, "run")[0] is False


def test_the_batchnorm_claims_compare_the_two_runs():
    weights, keeps, ignores = (claim("batchnorm", w) for w in ("|BatchNorm weight|", "within 0.1", "recalls fewer"))

    def rows(bn_rho=0.8, bn_ipr=0.6, bn_memorised=0.2, bn_phase="partial_inversion"):
        return [row(bn_phase if xi else "coexistence", alpha=0.65, xi=xi, corrupted_acc=bn_memorised,
                    extra={"run": "batchnorm", "bn_ipr_correlation": bn_rho, "mean_ipr": bn_ipr}) for xi in (0.0, 0.2)] + [
                row("partial_inversion" if xi else "coexistence", alpha=0.65, xi=xi, corrupted_acc=0.4,
                    extra={"run": "minibatch", "mean_ipr": 0.6}) for xi in (0.0, 0.2)]
    assert all(c.criterion(rows())[0] for c in (weights, keeps, ignores))
    assert weights.criterion(rows(bn_rho=0.1))[0] is False
    assert keeps.criterion(rows(bn_ipr=0.9))[0] is False
    assert ignores.criterion(rows(bn_memorised=0.5))[0] is False
    assert ignores.criterion(rows(bn_phase="memorization"))[0] is False


def test_the_width_claim_wants_the_wider_network_to_generalise_less():
    c = claim("width", "largest width")
    rows = [row("memorization" if xi >= limit else "coexistence", xi=xi, width=w)
            for w, limit in ((64, 0.4), (512, 0.2)) for xi in (0.0, 0.1, 0.2, 0.3, 0.4)]
    assert c.criterion(rows) == (True, "N 64: 80% generalise, N 512: 40% generalise")
    assert c.criterion([r for r in rows if r["width"] == 64] +
                       [row(r.phase, xi=r["xi"], width=512) for r in rows if r["width"] == 64])[0] is False


def test_the_architectures_claim_wants_each_run_to_sort_the_polynomials_as_predicted():
    c = claim("learnability-deep", "each architecture")
    rows = [row(test_acc=1.0 if SURVEY[op][0] == "learnable" else 0.1, op=op, extra={"run": run})
            for run in ("transformer", "deep-mlp") for op in ("x+y", "x^2+xy")]
    assert c.criterion(rows) == (True, "deep-mlp: 2 of 2 polynomials as predicted; transformer: 2 of 2 polynomials "
                                       "as predicted")
    rows[1] = row(test_acc=1.0, op="x^2+xy", extra={"run": "transformer"})
    holds, numbers = c.criterion(rows)
    assert holds is False and "transformer: 1 of 2 polynomials as predicted (not: x^2+xy)" in numbers
    assert set(reproduce.SURVEY_OPS) == set(SURVEY)  # the full size trains every surveyed polynomial


def test_the_experts_claim_wants_every_polynomial_exact():
    c = claim("experts", "accuracy 1")
    rows = [{"op": op, "p": p, "acc": 1.0, "mse": 0.012} for op in reproduce.APP_B for p in (97, 23)]
    assert c.criterion(rows) == (True, "6 of 6 exact on all p^2 inputs; MSE 0.0120-0.0120 (the paper's 0.0077-0.0102)")
    rows[3] = {**rows[3], "acc": 0.98}
    assert c.criterion(rows)[0] is False and c.criterion([])[0] is False


def test_the_family_and_trained_solution_claims():
    same = claim("transformer", "xi 0.15 without")
    rows = [row("coexistence", xi=0.0, wd=5.0), row("memorization", xi=0.15, wd=0.0),
            row("full_inversion", xi=0.15, wd=5.0), row("coexistence", xi=0.0, wd=0.0)]
    assert same.criterion(rows)[0] is True
    starved = [row("forgetting", xi=r["xi"], wd=r["wd"], alpha=0.1) for r in rows]  # a full diagram's other rows
    assert same.criterion(rows + starved)[0] is True and same.criterion(starved)[0] is False
    rows += [row("memorization", xi=0.15, wd=5.0, seed=s) for s in (1, 2)]  # two of three seeds memorise
    assert same.criterion(rows)[0] is False
    periodic_input = claim("transformer", "embed_ipr")
    rows = [row("full_inversion", xi=0.15, extra={"embed_ipr": 0.5}), row("memorization", extra={"embed_ipr": 0.15})]
    assert periodic_input.criterion(rows)[0] is True
    assert periodic_input.criterion([rows[0], row("memorization", extra={"embed_ipr": 0.45})])[0] is False
    assert periodic_input.criterion(rows[:1])[0] is False  # nothing memorises: no contrast
    periodic = claim("mul", "similarity")
    assert periodic.criterion([row(extra={"mean_ipr": 0.8, "analytic_similarity": 0.9})])[0] is True
    assert periodic.criterion([row(extra={"mean_ipr": 0.3, "analytic_similarity": 0.9})])[0] is False


TINY = {"axes": {"xi": "0,0.3", "wd": "0,15", "width": "8"}, "settings": {"p": 11, "steps": 30, "log_every": 10}}


@pytest.fixture
def tiny(monkeypatch):
    """The weight-decay experiment at a test's size (its criteria then decide on 4 models), and BatchNorm's two
    runs and the S-term analytic solution at p 7."""
    for name, quick in (("weight-decay", TINY),
                        ("batchnorm", {**TINY, "axes": {"alpha": "0.65", "xi": "0,0.2", "width": "8"},
                                       "settings": {**TINY["settings"], "batch_size": 16},
                                       "runs": {"batchnorm": {"settings": {"batchnorm": True}}, "minibatch": {}}}),
                        ("analytic-terms", {"p": 7, "widths": {2: "5,100", 3: "20,2000"}}),
                        ("experts", {"ops": reproduce.APP_B[:1], "p": (11,), "widths": (100, 1000)})):
        exp = reproduce.EXPERIMENTS[name]
        analyses = ("phase",) if name == "weight-decay" else exp.analyses
        monkeypatch.setitem(reproduce.EXPERIMENTS, name, reproduce.Experiment(exp.about, exp.full, quick, exp.kind,
                                                                              analyses))


def test_two_experiments_end_to_end_then_kept(tmp_path, tiny):
    out = tmp_path / "rep"
    args = ["reproduce", "--quick", "--only", "weight-decay,analytic-width", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "weight-decay: trained" in result.output and "analytic-width: trained" in result.output
    report = (out / "report.md").read_text()
    wanted = [c for c in reproduce.CLAIMS if c.experiment in ("weight-decay", "analytic-width")]
    lines = [line for line in report.splitlines() if line.startswith("| ") and "**" in line]
    assert len(lines) == len(wanted)
    assert all("**holds**" in line or "**differs**" in line or "**not run**" in line for line in lines)
    exact = next(line for line in lines if "largest width" in line)
    assert "**holds**" in exact and "test accuracy 1.000 at N 500" in exact  # the analytic solution at p 97
    assert "![weight-decay/phase-wd-vs-xi](weight-decay/phase-wd-vs-xi.png)" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table" in page
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "weight-decay: kept" in again.output and "analytic-width: kept" in again.output


def test_an_experiment_of_several_runs_is_checked_over_all_of_them(tmp_path, tiny):
    """BatchNorm against plain minibatches: two runs in DIR/batchnorm, their IPR and BatchNorm weights, and the
    claims that compare them; the S-term analytic solution: a run per S and one figure."""
    out = tmp_path / "rep"
    result = runner.invoke(app, ["reproduce", "--quick", "--only", "batchnorm,analytic-terms,experts", "--out",
                                 str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for run in ("batchnorm/batchnorm", "batchnorm/minibatch", "analytic-terms/terms-2", "analytic-terms/terms-3"):
        assert (out / run / "models.csv").is_file()
    assert "bn_ipr_correlation" in (out / "batchnorm/batchnorm/models.csv").read_text()
    assert "bn_ipr_correlation" not in (out / "batchnorm/minibatch/models.csv").read_text()
    report = (out / "report.md").read_text()
    for figure in ("batchnorm/batchnorm/ipr-vs-bn.png", "batchnorm/minibatch/ipr-hist.png",
                   "analytic-terms/accuracy-vs-width.png"):
        assert f"]({figure})" in report and (out / figure).is_file()
    names = ["batchnorm", "analytic-terms", "experts"]
    table = {t["claim"].criterion_text: t for t in reproduce.verdicts(out, names, True)}
    assert all(t["verdict"] in ("holds", "differs") for t in table.values()), table
    assert "S 2: N 100; S 3: N 2000" in table[claim("analytic-terms", "3-fold").criterion_text]["numbers"]
    assert table[claim("experts", "accuracy 1").criterion_text]["verdict"] == "holds"  # App. B's first, at p 11


def test_an_interrupted_reproduction_resumes_to_the_same_runs(tmp_path, tiny, ctrl_c_at_step):
    straight, out = tmp_path / "straight", tmp_path / "rep"
    args = ["reproduce", "--quick", "--only", "weight-decay", "--device", "cpu", "--out"]
    assert runner.invoke(app, [*args, str(straight)]).exit_code == 0
    restore = ctrl_c_at_step(12)
    result = runner.invoke(app, [*args, str(out)])
    assert result.exit_code == 130 and "Run the same command again to resume" in result.output, result.output
    assert "**not run**" in (out / "report.md").read_text()  # nothing finished: no verdict yet
    restore()
    result = runner.invoke(app, [*args, str(out)])
    assert result.exit_code == 0 and "weight-decay: resumed" in result.output, result.output
    assert (out / "weight-decay" / "models.csv").read_text() == (straight / "weight-decay" / "models.csv").read_text()


def test_an_unknown_experiment_is_one_line(tmp_path):
    result = runner.invoke(app, ["reproduce", "--only", "weight-decay,nope", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown experiment 'nope'" in result.output.strip().splitlines()[-1]


def test_the_help_names_every_experiment():
    result = runner.invoke(app, ["reproduce", "--help"], terminal_width=200)
    assert all(name in result.output for name in reproduce.EXPERIMENTS), result.output
