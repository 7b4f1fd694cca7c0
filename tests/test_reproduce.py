"""`fastgrok reproduce`: each claim's criterion on synthetic models.csv rows (a table where it holds and one where
it does not), two small experiments end to end (runs, report.md and report.html, verdicts), and the resume of an
interrupted reproduction."""

import pytest
from typer.testing import CliRunner

from fastgrok import reproduce
from fastgrok.backends import TorchBackend
from fastgrok.cli import app
from fastgrok.config import Hyper
from fastgrok.polynomials import SURVEY
from fastgrok.results import ModelRow

runner = CliRunner()


def row(phase="coexistence", test_acc=1.0, model=0, extra=None, **hyper):
    return ModelRow(model, Hyper(**hyper), {"test_acc": test_acc}, phase, False, 100, None, None, extra or {})


def diagram(phase_at=None):
    """wd-xi rows: phase_at maps (wd, xi) to a phase; every other cell coexistence at wd 0 and 5 and forgetting at
    wd 15 below xi 0.3, memorization above 0.3 at wd 0."""
    rows = []
    for wd in (0.0, 5.0, 15.0):
        for xi in (0.0, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5):
            default = ("forgetting" if wd == 15 else "memorization" if xi >= 0.3 and wd == 0 else
                       "full_inversion" if wd == 5 and 0.15 <= xi <= 0.3 else "coexistence")
            rows.append(row((phase_at or {}).get((wd, xi), default), xi=xi, wd=wd))
    return rows


def claim(experiment, where_word):
    return next(c for c in reproduce.CLAIMS if c.experiment == experiment and where_word in c.criterion_text)


@pytest.mark.parametrize("word, failing", [
    ("xi 0 and wd <= 5", {(0.0, 0.0): "memorization"}),
    ("wd 0 and xi >= 0.3", {(0.0, 0.3): "coexistence", (0.0, 0.4): "coexistence"}),
    ("wd 5 and xi 0.15-0.3", {(5.0, 0.15): "coexistence", (5.0, 0.2): "memorization"}),
    ("wd 15 are in forgetting", {(15.0, 0.3): "memorization", (15.0, 0.4): "memorization"}),
])
def test_each_phase_claim_holds_on_the_papers_diagram_and_not_when_a_cell_moves(word, failing):
    c = claim("wd-xi", word)
    assert c.criterion(diagram())[0] is True
    holds, numbers = c.criterion(diagram(failing))
    assert holds is False and "%" in numbers


def test_the_analytic_claim_wants_the_widest_exact_and_the_narrowest_not():
    c = claim("analytic-width", "largest width")
    assert c.criterion([row(test_acc=0.3, width=10), row(test_acc=1.0, width=500)])[0] is True
    assert c.criterion([row(test_acc=0.3, width=10), row(test_acc=0.99, width=500)])[0] is False
    assert c.criterion([row(test_acc=0.95, width=10), row(test_acc=1.0, width=500)])[0] is False


def test_the_learnability_claim_compares_each_polynomial_with_its_predicted_class():
    c = claim("learnability", "predicted")
    good = [row(test_acc=1.0 if predicted == "learnable" else 0.1, op=op, alpha=a, seed=s)
            for op, (predicted, _) in SURVEY.items() for a in (0.3, 0.5) for s in (0, 1)]
    assert c.criterion(good) == (True, f"{len(SURVEY)} of {len(SURVEY)} polynomials as predicted")
    bad = [row(test_acc=1.0 if r["op"] == "x^2+xy" else r["test_acc"], op=r["op"], alpha=r["alpha"], seed=r["seed"])
           for r in good]
    holds, numbers = c.criterion(bad)
    assert holds is False and "(not: x^2+xy)" in numbers


def test_the_ipr_claims_want_generalising_models_periodic_and_weight_decay_to_raise_ipr():
    separates, raises = claim("wd-xi", "0.3 above"), claim("wd-xi", "mean IPR exceeds")
    rows = [row("coexistence", xi=0.1, wd=5.0, extra={"mean_ipr": 0.8}),
            row("memorization", xi=0.1, wd=0.0, extra={"mean_ipr": 0.2})]
    assert separates.criterion(rows)[0] is True and raises.criterion(rows)[0] is True
    rows[1] = row("memorization", xi=0.1, wd=0.0, extra={"mean_ipr": 0.85})
    assert separates.criterion(rows)[0] is False and raises.criterion(rows)[0] is False


def test_the_pruning_claim_reads_the_pruning_curves(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = claim("wd-xi", "pruned low-IPR first")
    rows = [row("coexistence", model=3, xi=0.2, wd=0.0)]
    for corrupted, holds in ((0.05, True), (0.5, False)):
        pq.write_table(pa.table({"model": [3, 3, 3], "fraction": [0.0, 0.5, 1.0], "corrupted_acc": [0.8, corrupted, 0.0],
                                 "test_acc": [0.95, 0.96, 0.1]}), tmp_path / "prune-low.parquet")
        assert c.criterion(rows, tmp_path)[0] is holds
    assert c.criterion(rows, None)[0] is False  # never pruned


def test_the_family_and_trained_solution_claims():
    same = claim("transformer", "corrupted with")
    rows = [row("coexistence", xi=0.0, wd=5.0), row("memorization", xi=0.15, wd=0.0),
            row("full_inversion", xi=0.15, wd=5.0), row("coexistence", xi=0.0, wd=0.0)]
    assert same.criterion(rows)[0] is True
    rows[2] = row("memorization", xi=0.15, wd=5.0)
    assert same.criterion(rows)[0] is False
    periodic = claim("mul", "similarity")
    assert periodic.criterion([row(extra={"mean_ipr": 0.8, "analytic_similarity": 0.9})])[0] is True
    assert periodic.criterion([row(extra={"mean_ipr": 0.3, "analytic_similarity": 0.9})])[0] is False


TINY = {"axes": {"xi": "0,0.3", "wd": "0,15", "width": "8"}, "settings": {"p": 11, "steps": 30, "log_every": 10}}


@pytest.fixture
def tiny(monkeypatch):
    """The wd-xi experiment at a test's size (its criteria then decide on 4 models)."""
    exp = reproduce.EXPERIMENTS["wd-xi"]
    monkeypatch.setitem(reproduce.EXPERIMENTS, "wd-xi", reproduce.Experiment(exp.about, exp.full, TINY, analyses=("phase",)))


def test_two_experiments_end_to_end_then_kept(tmp_path, tiny):
    out = tmp_path / "rep"
    args = ["reproduce", "--quick", "--only", "wd-xi,analytic-width", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wd-xi: trained" in result.output and "analytic-width: trained" in result.output
    report = (out / "report.md").read_text()
    wanted = [c for c in reproduce.CLAIMS if c.experiment in ("wd-xi", "analytic-width")]
    lines = [line for line in report.splitlines() if line.startswith("| ") and "**" in line]
    assert len(lines) == len(wanted) and all("**holds**" in line or "**differs**" in line for line in lines)
    exact = next(line for line in lines if "largest width" in line)
    assert "**holds**" in exact and "test accuracy 1.000 at N 500" in exact  # the analytic solution at p 97
    assert "![wd-xi: phase](wd-xi/phase-wd-vs-xi.png)" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table" in page
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "wd-xi: kept" in again.output and "analytic-width: kept" in again.output


def test_an_interrupted_reproduction_resumes_to_the_same_runs(tmp_path, tiny, monkeypatch):
    straight, out = tmp_path / "straight", tmp_path / "rep"
    args = ["reproduce", "--quick", "--only", "wd-xi", "--device", "cpu", "--out"]
    assert runner.invoke(app, [*args, str(straight)]).exit_code == 0
    real, calls = TorchBackend.step, {"n": 0}

    def step(self, pop):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(self, pop)

    monkeypatch.setattr(TorchBackend, "step", step)
    result = runner.invoke(app, [*args, str(out)])
    assert result.exit_code == 130 and "Run the same command again to resume" in result.output, result.output
    assert "**not run**" in (out / "report.md").read_text()  # nothing finished: no verdict yet
    monkeypatch.setattr(TorchBackend, "step", real)
    result = runner.invoke(app, [*args, str(out)])
    assert result.exit_code == 0 and "wd-xi: resumed" in result.output, result.output
    assert (out / "wd-xi" / "models.csv").read_text() == (straight / "wd-xi" / "models.csv").read_text()


def test_an_unknown_experiment_is_one_line(tmp_path):
    result = runner.invoke(app, ["reproduce", "--only", "wd-xi,nope", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown experiment 'nope'" in result.output.strip().splitlines()[-1]


def test_the_help_names_every_experiment():
    result = runner.invoke(app, ["reproduce", "--help"], terminal_width=200)
    assert all(name in result.output for name in reproduce.EXPERIMENTS), result.output
