"""IPR, the analytic solution, pruning by IPR, phase diagrams and curves (CPU, small sizes)."""

import math
from functools import partial
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fastgrok import analysis, plots
from fastgrok.analytic import analytic_weights
from fastgrok.cli import app
from fastgrok.data import task_table
from fastgrok.errors import ConfigError
from fastgrok.families.mlp import MLP, forward
from fastgrok.ipr import neuron_ipr, neuron_spectra, vector_ipr
from fastgrok.phases import PHASES
from fastgrok.results import read_config, read_models, recipe
from fastgrok.train import first_reached

runner = CliRunner()
P = 97


def mlp_parts(U, V, W):
    """The MLP family's IPR vectors of stacked U, V (B, p, N) and W (B, N, p)."""
    return MLP.ipr_parts({"U": U, "V": V, "W": W})


def numpy_ipr(x, fft="rfft"):
    x = np.asarray(x, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x) if fft == "rfft" else np.fft.fft(x))
    return (spectrum**4).sum() / (spectrum**2).sum() ** 2


@pytest.mark.parametrize("s, phase", [(1, 0.0), (7, 1.3), (48, -2.0)])
def test_a_pure_cosine_has_ipr_one_under_rfft(s, phase):
    x = torch.cos(2 * math.pi * s * torch.arange(P) / P + phase)
    assert vector_ipr(x).item() == pytest.approx(1.0, abs=1e-9)
    assert vector_ipr(x, fft="full").item() == pytest.approx(0.5, abs=1e-9)  # two mirror peaks


def test_random_rows_have_the_small_ipr_expected():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, P, generator=g)
    ipr = vector_ipr(x).mean().item()
    # |rfft| of white noise: 49 bins with Rayleigh magnitudes, E|z|^4 / (E|z|^2)^2 = 2, so IPR ~ 2 / 49
    assert ipr == pytest.approx(2 / 49, rel=0.15)


def test_batched_ipr_equals_per_neuron_numpy():
    g = torch.Generator().manual_seed(1)
    U, V, W = torch.randn(3, 11, 5, generator=g), torch.randn(3, 11, 5, generator=g), torch.randn(3, 5, 11, generator=g)
    for fft in ("rfft", "full"):
        result = neuron_ipr(mlp_parts(U, V, W), fft)
        for b in range(3):
            for k in range(5):
                parts = [numpy_ipr(U[b, :, k].numpy(), fft), numpy_ipr(V[b, :, k].numpy(), fft), numpy_ipr(W[b, k].numpy(), fft)]
                assert result.parts["u"][b, k].item() == pytest.approx(parts[0], rel=1e-9)
                assert result.parts["w"][b, k].item() == pytest.approx(parts[2], rel=1e-9)
                assert result.mean[b, k].item() == pytest.approx(np.mean(parts), rel=1e-9)


def test_dead_neurons_are_flagged_not_nan():
    U, V, W = torch.randn(1, 7, 4), torch.randn(1, 7, 4), torch.randn(1, 4, 7)
    U[0, :, 2] = V[0, :, 2] = W[0, 2] = 0
    U[0, :, 3] = 0  # only its U row is zero: the neuron lives, its IPR averages V and W
    result = neuron_ipr(mlp_parts(U, V, W))
    assert result.dead.tolist() == [[False, False, True, False]]
    assert not result.model_mean().isnan().any()
    assert result.mean[0, 3].item() == pytest.approx((result.parts["v"][0, 3] + result.parts["w"][0, 3]).item() / 2)
    assert result.high_fraction(0.0)[0].item() == pytest.approx(1.0)  # 3 live neurons, all above 0


def test_a_periodic_neurons_spectrum_is_one_frequency_and_a_dead_one_has_none():
    s = torch.tensor([1, 7, 48, 60, 90, 5])  # rfft bins min(s, p - s): 1, 7, 48, 37, 7, 5
    theta = 2 * math.pi * torch.arange(P)[:, None] * s / P  # (p, N)
    U, V, W = torch.cos(theta + 0.3), torch.cos(theta - 1.1), torch.cos(-theta - 0.8).T
    U[:, 4] = V[:, 4] = W[4] = 0  # dead
    # noise in U alone: V and W keep their frequency, U's third of the power spreads
    U[:, 5] = torch.randn(P, generator=torch.Generator().manual_seed(0))
    spectra = neuron_spectra(mlp_parts(U[None], V[None], W[None]))[0]
    assert spectra.shape == (6, P // 2 + 1)
    assert spectra.argmax(1)[:4].tolist() == [1, 7, 48, 37]
    assert spectra[:4].max(1).values.min().item() > 0.999
    assert spectra[4].isnan().all() and torch.allclose(spectra[[0, 1, 2, 3, 5]].sum(1), torch.ones(5, dtype=torch.float64))
    assert 0.66 < spectra[5, 5].item() < 0.75  # V's and W's all, U's share of bin 5 (about 1/49)
    full = neuron_spectra(mlp_parts(U[None], V[None], W[None]), fft="full")[0]
    assert full[1, 7].item() == pytest.approx(0.5) and full[1, P - 7].item() == pytest.approx(0.5)  # mirror peaks


def test_the_spectra_show_one_model_per_phase_the_median_by_ipr():
    mean_ipr = {0: 0.9, 1: 0.7, 2: 0.8, 3: 0.1, 4: float("nan"), 5: 0.2, 6: 0.05}
    phase_of = {0: "coexistence", 1: "coexistence", 2: "coexistence", 3: "memorization", 4: "diverged",
                5: "memorization", 6: "forgetting"}
    assert analysis.representatives(mean_ipr, phase_of) == [2, 3, 6]  # coexistence, memorization, forgetting


def analytic_accuracy(width, seed):
    x, z = task_table("add", P)
    U, V, W = analytic_weights(P, width, seed)
    return (forward((U[None], V[None]), W[None], x[:, None], "quad").argmax(-1)[0] == z).float().mean().item()


def test_analytic_solution_is_exact_from_width_200_and_poor_at_20():
    for width in (200, 300, 500):
        for seed in (0, 1, 2):
            assert analytic_accuracy(width, seed) == 1.0
    assert max(analytic_accuracy(20, seed) for seed in range(3)) < 0.5
    U, V, W = analytic_weights(P, 200, 0)
    result = neuron_ipr(mlp_parts(U[None], V[None], W[None]))
    assert result.mean.min().item() > 0.999  # every neuron a single frequency


def test_analytic_run_is_accepted_by_ipr_and_prune(tmp_path):
    out = tmp_path / "analytic"
    result = runner.invoke(app, ["analytic", "--p", "31", "--width", "10,120", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_models(out)
    assert [r["width"] for r in rows] == [10, 120] and rows[1]["test_acc"] == 1.0
    assert runner.invoke(app, ["ipr", str(out)]).exit_code == 0
    assert read_models(out)[1]["mean_ipr"] > 0.999
    assert runner.invoke(app, ["prune", str(out), "--models", "1", "--every", "10"]).exit_code == 0
    assert (out / "prune-low.png").stat().st_size > 5000
    # a model whose neurons are all dead has no spectra to draw: none is claimed, and no older picture is left
    assert (out / "ipr-spectra.png").is_file()
    path = next(path for path in (out / "weights").glob("*.safetensors") if load_file(path)["model"].tolist() == [0])
    save_file({k: v if k == "model" else torch.zeros_like(v) for k, v in load_file(path).items()}, path)
    result = runner.invoke(app, ["ipr", str(out), "--models", "0"])
    assert result.exit_code == 0 and "ipr-spectra" not in result.output and not (out / "ipr-spectra.png").exists()


def test_a_few_models_are_read_without_reading_the_populations_around_them(tmp_path, monkeypatch):
    """load_populations(models=...) gives exactly those models' weights (as the full read has them), reads a
    population holding none of them no further than its model ids, and of one that does only their rows."""
    import safetensors

    from fastgrok.results import load_populations, read_weights

    out = tmp_path / "run"
    args = ["train", "--p", "7", "--width", "8,12", "--xi", "0:0.5:6", "--steps", "3", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0  # two populations of 6 models: N 8 even ids, N 12 odd
    full = {int(m): (w["U"][i], w["V"][i], w["W"][i]) for w in read_weights(out) for i, m in enumerate(w["model"])}
    spans = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            spans.append((name, "all"))
            return self.inner.get_tensor(name)

        def get_slice(self, name):
            inner = self.inner.get_slice(name)
            return type("Slice", (), {"__getitem__": lambda _, k: spans.append((name, (k.start, k.stop))) or inner[k],
                                      "get_shape": lambda _: inner.get_shape()})()  # metadata, no read

    monkeypatch.setattr("fastgrok.results.safe_open", Spy)
    pops = list(load_populations(out, models={3, 5, 11}))
    assert [pop.model_ids for pop in pops] == [[3, 5, 11]] and pops[0].width == 12
    for b, m in enumerate(pops[0].model_ids):
        assert all(torch.equal(got[b], want) for got, want in zip((pops[0].U, pops[0].V, pops[0].W), full[m]))
    assert sorted(s for s in spans if s[0] != "model") == [(name, rows) for name in "UVW" for rows in [(1, 3), (5, 6)]]
    assert {s for s in spans if s[0] == "model"} == {("model", "all")}  # each file's model ids: 8 bytes a model


def test_analysis_reads_a_large_run_in_pieces_with_the_same_results(tmp_path, monkeypatch):
    """With READ_BYTES room for two models, read_weights gives a population of five in pieces of at most two
    (whole models, in order, as one read has them), and ipr and prune, reading so, write what they write reading
    whole populations (prune's losses to fp32 rounding): their memory does not grow with the run."""
    import fastgrok.results as results

    out = tmp_path / "run"
    args = ["train", "--p", "7", "--width", "8", "--xi", "0:0.4:5", "--steps", "30", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    whole = list(results.read_weights(out))
    assert len(whole) == 1 and whole[0]["model"].tolist() == list(range(5))
    analysis.ipr(out, models="all")
    analysis.prune(out, models="all", every=4)
    expected = {name: pq.read_table(out / name) for name in ("ipr.parquet", "prune-low.parquet")}
    monkeypatch.setattr(results, "READ_BYTES", 2 * 4 * 3 * 7 * 8)  # U, V, W of two models of p 7, N 8
    pieces = list(results.read_weights(out))
    assert [w["model"].tolist() for w in pieces] == [[0, 1], [2, 3], [4]]
    for name in whole[0]:
        assert torch.equal(torch.cat([w[name] for w in pieces]), whole[0][name]), name
    assert [w["model"].tolist() for w in results.read_weights(out, {0, 2, 3, 4})] == [[0, 2], [3, 4]]
    reported = []
    analysis.ipr(out, models="all", progress=lambda *done: reported.append(done))
    assert reported == [(2, 5), (4, 5), (5, 5)]  # a piece at a time
    analysis.prune(out, models="all", every=4)
    for name, table in expected.items():
        got = pq.read_table(out / name)
        assert got.column_names == table.column_names, name
        for column in table.column_names:  # NaN (an accuracy over no corrupted example) equals NaN here
            # a loss is an fp32 sum, whose rounding may follow the number of models evaluated together
            tol = 1e-6 if column.endswith("_loss") else 0
            np.testing.assert_allclose(got[column].to_numpy(), table[column].to_numpy(), rtol=tol, atol=0,
                                       err_msg=f"{name} {column}")


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every figure `plots` saves while a test runs, kept (closed, but still readable and drawable)."""
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    return figures


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _shown_tick_labels(axis) -> list[str]:
    low, high = axis.get_view_interval()
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs()) if t.get_text() and low <= v <= high]


@pytest.fixture(scope="module")
def coexistence_run(tmp_path_factory):
    """A model that memorises most corrupted labels and still generalises (p 47, N 128, 1000 steps: ~3 s)."""
    out = tmp_path_factory.mktemp("runs") / "coexist"
    args = ["train", "--p", "47", "--width", "128", "--alpha", "0.6", "--xi", "0.35", "--wd", "1", "--steps", "1000",
            "--log-every", "250", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    row = read_models(out)[0]
    assert row["phase"] == "coexistence" and row["corrupted_acc"] > 0.7
    return out


def test_pruning_low_ipr_neurons_removes_memorisation_and_keeps_generalisation(coexistence_run):
    reported = []
    curve = analysis.prune(coexistence_run, order="low", every=4, progress=lambda *p: reported.append(p))[0]
    assert reported == [(k, 33) for k in range(1, 34)]  # 0, 4, ..., 128 neurons pruned: 33 levels of one model
    half = np.searchsorted(curve["fraction"], 0.5)
    assert curve["corrupted_acc"][0] > 0.7
    assert curve["corrupted_acc"][half] < 0.15
    assert curve["test_acc"][half] >= 0.95
    assert curve["inverted_acc"][half] > 0.8  # the corrupted examples now get their true labels


def test_pruning_high_ipr_neurons_first_destroys_generalisation(coexistence_run):
    curve = analysis.prune(coexistence_run, order="high", every=4)[0]
    half = np.searchsorted(curve["fraction"], 0.5)
    assert curve["test_acc"][half] < 0.2
    table = pq.read_table(coexistence_run / "prune-high.parquet").to_pydict()
    assert table["test_acc"] == pytest.approx(list(curve["test_acc"]), nan_ok=True)


def test_ipr_command_writes_table_histogram_and_columns(coexistence_run):
    result = runner.invoke(app, ["ipr", str(coexistence_run)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(coexistence_run / "ipr.parquet")
    assert table.num_rows == 128 and table.column("ipr").null_count == 0
    row = read_models(coexistence_run)[0]
    assert 0 < row["high_ipr_fraction"] < 1 and row["dead_neurons"] == 0
    assert (coexistence_run / "ipr-hist.png").stat().st_size > 5000
    assert (coexistence_run / "ipr-spectra.png").stat().st_size > 5000 and "ipr-spectra.png" in result.output


def test_training_logs_mean_ipr_and_plot_draws_it(coexistence_run):
    history = pq.read_table(coexistence_run / "history").to_pydict()
    assert history["step"] == [0, 250, 500, 750, 1000]
    assert history["ipr"][-1] > history["ipr"][0] * 2  # periodic features grow during training
    result = runner.invoke(app, ["plot", str(coexistence_run)])
    assert result.exit_code == 0 and (coexistence_run / "curves-model0.png").stat().st_size > 5000


def test_a_coexistence_model_memorises_before_it_generalises_and_models_csv_says_when(coexistence_run):
    """train90_step / test90_step: the first logged step at which train / test accuracy reached 90%, read from
    the history; the corrupted labels are fitted before the rule is found (the grokking delay)."""
    history = pq.read_table(coexistence_run / "history").to_pydict()
    row = read_models(coexistence_run)[0]
    for kind in ("train", "test"):
        first = next(step for step, acc in zip(history["step"], history[f"{kind}_acc"]) if acc >= 0.9)
        assert row[f"{kind}90_step"] == first
    assert row["train90_step"] < row["test90_step"]
    result = runner.invoke(app, ["phase", str(coexistence_run), "--metric", "test90_step"])
    assert result.exit_code == 0 and (coexistence_run / "test90_step-alpha-vs-xi.png").is_file(), result.output
    assert f"test90_step (mean over seeds, diverged models and those never at 90% left out) {row['test90_step']:g} to" in result.output


def test_first_reached_is_the_earliest_logged_step_at_90_percent():
    history = {"model": [3, 5, 3, 5, 3, 5], "step": [20, 20, 10, 10, 0, 0],  # logged in any order
               "test_acc": [0.95, 0.5, 0.9 - 1e-12, 0.89, 0.2, float("nan")]}
    assert first_reached(history, "test_acc") == {3: 10}  # 0.9 up to rounding counts, as in the phases


def test_phase_diagram_table_equals_models_csv(tmp_path, saved_figures):
    out = tmp_path / "grid"
    args = ["train", "--p", "11", "--width", "8", "--steps", "20", "--log-every", "10", "--xi", "0,0.3,0.6",
            "--alpha", "0.4,0.7", "--wd", "0,1", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["phase", str(out), "--x", "xi", "--y", "alpha"])
    assert result.exit_code == 0, result.output
    table = analysis.phase_diagram(out, "xi", "alpha")
    by_cell = {(r["wd"], r["xi"], r["alpha"]): r["phase"] for r in table}
    rows = read_models(out)
    assert len(table) == len(rows) == 12
    assert all(by_cell[(r["wd"], r["xi"], r["alpha"])] == r["phase"] for r in rows)
    assert (out / "phase-alpha-vs-xi.png").stat().st_size > 5000
    assert recipe(read_config(out)) == "p 11, width 8, dropout 0, lr 0.01, 20 steps, full batch"
    del saved_figures[:]  # those of the commands above
    analysis.phase_diagram(out, "xi", "alpha")
    assert [fig.get_suptitle() for fig in saved_figures] == [recipe(read_config(out))]  # how its models were trained


def test_the_phase_legend_names_every_colour_and_mark_a_panel_shows(tmp_path, saved_figures):
    """Diverged cells are black, disagreeing seeds marked x, and an interrupted run's untrained cells blank: the
    legend names each that a panel shows."""
    five = list(PHASES)  # as models.csv and --models write them
    grid, agree = np.array([[0, 1, 2], [3, 4, 0]]), np.ones((2, 3))
    diverged, split = grid.copy(), agree.copy()
    diverged[1, 2], split[0, 1] = len(PHASES), 2 / 3
    draw = partial(plots.phase_heatmaps, x_name="xi", x_values=[0, 0.1, 0.2], y_name="alpha", y_values=[0.3, 0.5],
                   path=tmp_path / "phases.png")
    draw([("wd 0", grid, agree)])
    draw([("wd 0", grid, agree), ("wd 5", diverged, agree)])
    draw([("wd 0", grid, split)])
    draw([("wd 0", np.array([[0, 1, 2], [3, -1, -1]]), agree)])  # a run stopped before two cells' models trained
    assert list(map(_legend_texts, saved_figures)) == [five, [*five, "diverged"], [*five, "seeds disagree (majority shown)"],
                                                       [*five, "not trained"]]


def test_phase_defaults_to_the_axes_the_grid_varies(tmp_path):
    out = tmp_path / "xi-wd"
    args = ["train", "--p", "11", "--width", "8", "--steps", "10", "--log-every", "10", "--xi", "0,0.5",
            "--wd", "0,1,2", "--seed", "0,1", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["phase", str(out)])
    assert result.exit_code == 0, result.output
    assert "6 cells of wd x xi" in result.output and (out / "phase-wd-vs-xi.png").is_file()
    assert "one value" not in result.output
    result = runner.invoke(app, ["phase", str(out), "--x", "lr", "--y", "xi"])  # asked for, not varied: said
    assert result.exit_code == 0 and "note: lr takes one value in this run (0.01): the diagram is one column" in result.output
    grid = {"xi": [0.0], "alpha": [0.5], "width": [16, 32], "wd": [0.0, 1.0], "dropout": [0.0], "lr": [0.01],
            "seed": [0, 1]}
    assert analysis.phase_axes(grid) == ("width", "wd")
    assert analysis.phase_axes(grid, y="width") == ("wd", "width")
    assert analysis.phase_axes({**grid, "width": [16]}) == ("wd", "xi")  # one varying axis: xi fills in
    assert analysis.phase_axes({**grid, "xi": [0.0, 0.5], "alpha": [0.3, 0.5]}) == ("xi", "alpha")


def test_grid_values_six_digits_cannot_hold_keep_their_cells(tmp_path):
    """xi 0:0.1:4 is 0, 1/30, 2/30, 0.1: a models.csv value matches its grid value only to its digits, so the
    grid's own value is read back (else the diagram would lose the cells of 1/30 and 2/30), also from a models.csv
    rounded to 6 digits; a models.csv that is not the config's grid is refused."""
    out = tmp_path / "thirds"
    args = ["train", "--p", "7", "--width", "4", "--steps", "2", "--xi", "0:0.1:4", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    grid_xi = read_config(out)["grid"]["xi"]
    assert [r["xi"] for r in read_models(out)] == grid_xi and "0.0333333333333" in (out / "models.csv").read_text()
    text = (out / "models.csv").read_text()
    (out / "models.csv").write_text(text.replace("0.0333333333333", "0.0333333").replace("0.0666666666667", "0.0666667"))
    assert [r["xi"] for r in read_models(out)] == grid_xi
    assert sorted(r["xi"] for r in analysis.phase_diagram(out, "xi", "alpha")) == grid_xi
    (out / "models.csv").write_text(text.replace("0.0333333333333", "0.5"))
    result = runner.invoke(app, ["phase", str(out)])
    assert result.exit_code == 2 and "not the grid's model 1" in result.output


def test_seeds_are_aggregated_by_majority(tmp_path):
    out = tmp_path / "seeds"
    args = ["train", "--p", "11", "--width", "8", "--steps", "10", "--log-every", "10", "--xi", "0,0.5",
            "--seed", "0,1,2", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    table = analysis.phase_diagram(out, "xi", "alpha")
    rows = read_models(out)
    for cell in table:
        phases = [r["phase"] for r in rows if r["xi"] == cell["xi"]]
        assert cell["seeds"] == 3
        assert phases.count(cell["phase"]) == max(phases.count(p) for p in phases)
        assert cell["agreement"] == pytest.approx(phases.count(cell["phase"]) / 3)


def test_metric_diagram_is_the_seed_mean_of_models_csv_without_diverged_models(tmp_path, saved_figures):
    out = tmp_path / "metric"
    args = ["train", "--p", "11", "--width", "8", "--steps", "20", "--log-every", "10", "--xi", "0,0.5",
            "--wd", "0,1", "--lr", "0.01,1e6", "--seed", "0,1", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    rows = read_models(out)
    assert all(r["diverged"] for r in rows if r["lr"] == 1e6) and not any(r["diverged"] for r in rows if r["lr"] == 0.01)
    result = runner.invoke(app, ["phase", str(out), "--metric", "corrupted_acc", "--x", "xi", "--y", "wd"])
    assert result.exit_code == 0, result.output
    assert "8 cells of wd x xi: corrupted_acc" in result.output
    table = analysis.metric_diagram(out, "corrupted_acc", "xi", "wd")
    assert len(table) == 8
    for cell in table:
        kept = [r["corrupted_acc"] for r in rows if (r["lr"], r["xi"], r["wd"]) == (cell["lr"], cell["xi"], cell["wd"])
                and not r["diverged"] and r["corrupted_acc"] is not None]
        assert cell["models"] == len(kept) == (2 if cell["lr"] == 0.01 and cell["xi"] == 0.5 else 0)
        assert cell["corrupted_acc"] == pytest.approx(np.mean(kept)) if kept else math.isnan(cell["corrupted_acc"])
    with open(out / "corrupted_acc-wd-vs-xi.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "lr,xi,wd,corrupted_acc,std,models" and len(lines) == 9
    assert lines[1] == "0.01,0,0,,,0"  # no corrupted labels at xi 0: blank, not 0
    assert (out / "corrupted_acc-wd-vs-xi.png").stat().st_size > 5000
    analysis.metric_diagram(out, "test_acc", "xi", "wd")
    # the figures' note of why cells are blank
    assert list(map(_legend_texts, saved_figures)) == [["blank: no corrupted examples or diverged"]] * 2 + [["blank: diverged"]]


def test_a_diverged_models_loss_curve_says_where_it_stopped_being_finite(tmp_path, saved_figures):
    """A diverged model's losses are inf from the step it blew up, which a log axis silently leaves out: its
    loss panel once held nothing visible, on steps of its own (-0.04 to 0.04)."""
    step = np.array([0.0, 50, 100, 150])
    history = {"step": step, "ipr": np.full(4, 0.3), **{k: np.full(4, 0.5) for k in plots.ACCURACIES},
               "train_loss": np.array([0.09, np.inf, np.inf, np.inf]), "test_loss": np.array([0.1, 0.08, 0.07, 0.06])}
    plots.training_curves(history, tmp_path / "curves.png", "one model")
    _, loss, _ = saved_figures[0].axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train (not finite from step 50)", "test"]
    assert loss.get_xlim()[0] <= 0 and loss.get_xlim()[1] >= 150  # the steps every panel shares
    assert loss.get_lines()[0].get_marker() == "o"  # its one finite point is drawn


def test_the_prune_legend_names_every_metric_any_panel_draws_in_one_colour_each(tmp_path, saved_figures):
    """The legend sat in the first panel alone: a clean model there (no corrupted subset) left the corrupted and
    inverted curves of the panels after it unnamed."""
    fraction = np.linspace(0, 1, 5)
    clean = {"fraction": fraction, **{k: np.full(5, 0.9) for k in plots.ACCURACIES},
             "corrupted_acc": np.full(5, np.nan), "inverted_acc": np.full(5, np.nan)}
    noisy = {"fraction": fraction, **{k: np.linspace(0.9, 0.1, 5) for k in plots.ACCURACIES}}
    plots.prune_curves({0: clean, 21: noisy}, tmp_path / "prune.png", "pruning")
    fig = saved_figures[0]
    assert _legend_texts(fig) == list(plots.ACCURACIES.values())
    first, second = ([line.get_color() for line in ax.get_lines()] for ax in fig.axes[:2])
    assert first == second[:3] and len(set(second)) == 5  # a metric keeps its colour from panel to panel


def test_a_loss_within_a_decade_is_labelled_in_plain_numbers(tmp_path, saved_figures):
    """A forgetting model's loss moves within 0.0185-0.0216: its axis once read '2.1x10^-2' and '2x10^-2'."""
    step = np.array([0.0, 100, 200, 300])
    history = {"step": step, "ipr": np.full(4, 0.3), **{k: np.full(4, 0.5) for k in plots.ACCURACIES}}
    for train_loss in ([0.0216, 0.0187, 0.0196, 0.0193], [0.02, 1e-3, 1e-4, 1e-5]):
        history |= {"train_loss": np.array(train_loss), "test_loss": np.array(train_loss) * 1.01}
        plots.training_curves(history, tmp_path / "curves.png", "one model")
    for fig in saved_figures:
        fig.canvas.draw()
    narrow, wide = (_shown_tick_labels(fig.axes[1].yaxis) for fig in saved_figures)
    assert len(narrow) >= 2 and all(0.018 <= float(label) <= 0.022 for label in narrow)
    assert wide and all("10^{-" in label for label in wide)  # across decades, powers of ten as before


def test_the_bench_figure_labels_its_log_axes_with_plain_counts(tmp_path, saved_figures):
    """Rates within one decade once showed only '2x10^2' on the y axis and B 1 to 16 only '10^0' and '10^1'."""
    rate = {(1, 128): 180.0, (16, 128): 230.0, (1, 500): 3_100.0, (16_384, 500): 37_000.0}
    report = {"device": "cpu", "date": "2026-11-24", "setting": {"p": 97, "alpha": 0.5, "loss": "mse",
                                                                 "optimizer": "adamw"},
              "results": [{"backend": "torch", "width": n, "models": b, "model_steps_per_s": r}
                          for (b, n), r in rate.items()]}
    plots.bench_throughput(report, tmp_path / "bench.png")
    fig = saved_figures[0]
    fig.canvas.draw()
    (x128, y128), (x500, y500) = ((_shown_tick_labels(ax.xaxis), _shown_tick_labels(ax.yaxis)) for ax in fig.axes)
    assert x128 == ["1", "2", "5", "10"] and len(y128) >= 2 and all(label.isdigit() for label in y128)
    assert x500 == ["1", "10", "100", "1k", "10k"] and y500 == ["5k", "10k", "20k"]


def test_plot_of_a_phase_draws_its_models_mean_and_percentile_band(tmp_path, monkeypatch):
    out = tmp_path / "curves"
    args = ["train", "--p", "11", "--width", "16", "--steps", "60", "--log-every", "20", "--xi", "0,0.5",
            "--wd", "0,50", "--seed", "0,1,2", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    drawn = {}
    draw = plots.training_curves
    monkeypatch.setattr(plots, "training_curves",
                        lambda h, path, title, band=None: (drawn.__setitem__(path.name, (h, band)), draw(h, path, title, band))[1])
    result = runner.invoke(app, ["plot", str(out), "--models", "all"])
    assert result.exit_code == 0, result.output
    rows = read_models(out)
    phases = {r["phase"] for r in rows}
    assert phases == {"memorization", "forgetting"}  # wd 0 memorises, wd 50 forgets
    assert set(drawn) == {f"curves-{p}.png" for p in phases}
    history = {k: np.asarray(v) for k, v in pq.read_table(out / "history").to_pydict().items()}
    for phase in phases:
        ids = [r["model"] for r in rows if r["phase"] == phase]
        mean, band = drawn[f"curves-{phase}.png"]
        assert list(mean["step"]) == [0, 20, 40, 60]
        for step_index, step in enumerate(mean["step"]):
            at = (history["step"] == step) & np.isin(history["model"], ids)
            assert at.sum() == len(ids)
            for key in ("test_acc", "train_loss", "ipr"):
                assert mean[key][step_index] == pytest.approx(history[key][at].mean())
                assert band[key][:, step_index] == pytest.approx(np.quantile(history[key][at], (0.1, 0.9)))
    assert (out / f"curves-{rows[0]['phase']}.png").stat().st_size > 5000
    assert runner.invoke(app, ["plot", str(out), "--models", rows[0]["phase"]]).output.strip() == \
        f"wrote {out / ('curves-' + rows[0]['phase'] + '.png')}"


@pytest.mark.parametrize("metric, name", [("inverted_acc", "inverted"), ("high_ipr_fraction", "high-ipr")])
def test_the_gallery_metric_tables_are_the_seed_means_of_the_h100_run(metric, name):
    """docs/gallery's metric tables hold, per (wd, xi, alpha) cell, the mean of the H100 run's models.csv
    (bench/results/h100-2026-11-22) over the cell's non-diverged models with a value, computed here on their own;
    and the gallery's reading holds: only weight decay 5 and 15 invert (nearly) every corrupted label."""
    import csv

    root = Path(__file__).resolve().parent.parent
    with open(root / "bench/results/h100-2026-11-22/wd-diagram-models.csv", newline="") as f:
        models = list(csv.DictReader(f))
    cells: dict[tuple, list[float]] = {}
    for r in models:
        if r["diverged"] != "True" and r[metric] != "":
            cells.setdefault(tuple(round(float(r[a]), 9) for a in ("wd", "xi", "alpha")), []).append(float(r[metric]))
    with open(root / f"docs/gallery/paper-{name}-wd-17x17.csv", newline="") as f:
        gallery = list(csv.DictReader(f))
    assert len(gallery) == 17 * 17 * 4
    for row in gallery:
        values = cells.get(tuple(round(float(row[a]), 9) for a in ("wd", "xi", "alpha")), [])
        assert int(row["models"]) == len(values)
        assert float(row[metric] or "nan") == pytest.approx(np.mean(values) if values else math.nan, abs=1e-6,
                                                             nan_ok=True)
    if metric == "inverted_acc":
        inverting = {wd for (wd, xi, alpha), values in cells.items() if np.mean(values) >= 0.9}
        assert inverting == {5.0, 15.0}


@pytest.mark.parametrize(
    "args, message",
    [
        (["phase", "{run}", "--metric", "beta"], "unknown --metric"),
        (["phase", "{run}", "--metric", "mean_ipr"], "`fastgrok ipr RUN` adds it"),
        (["phase", "{run}", "--x", "beta"], "unknown axis"),
        (["phase", "{run}", "--x", "xi", "--y", "xi"], "different axes"),
        (["prune", "{run}", "--order", "middle"], "unknown --order"),
        (["prune", "{run}", "--models", "99"], "not in this run"),
        (["ipr", "{run}", "--fft", "dct"], "unknown --fft"),
        (["ipr", "{run}", "--threshold", "2"], "--threshold must be in (0, 1)"),  # no neuron would be high-IPR
        (["plot", "{run}", "--models", "x,y"], "--models"),
        (["ipr", "{missing}"], "not a fastgrok run"),
        (["analytic", "--op", "sub"], "known for add and mul, got --op sub"),
        (["analytic", "--op", "mul", "--p", "91"], "needs a prime p"),
        (["analytic", "--terms", "9"], "--terms must be between 2 and 8"),
        (["ipr", "{run}", "--basis", "dft"], "unknown --basis"),
    ],
)
def test_analysis_bad_input_is_one_line(tmp_path, args, message):
    out = tmp_path / "tiny"
    assert runner.invoke(app, ["train", "--p", "7", "--width", "4", "--steps", "2", "--out", str(out)]).exit_code == 0
    args = [a.format(run=out, missing=tmp_path / "nothing") for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.rstrip().splitlines()  # no blank line left by a progress bar either
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_model_selection_by_ids_phase_or_all():
    rows = [SimpleNamespace(model=i, phase=phase) for i, phase in enumerate(["coexistence", "memorization", "coexistence"])]
    assert analysis.select_models(rows, "2,0,2") == [2, 0]  # in the order given, a repeated id once
    assert analysis.select_models(rows, "coexistence") == [0, 2]
    assert analysis.select_models(rows, "all") is None and analysis.select_models(rows, None) is None
    with pytest.raises(ConfigError, match="no model of this run is in phase 'forgetting'"):
        analysis.select_models(rows, "forgetting")


def test_rank_correlation_ranks_each_row_over_its_live_neurons():
    a = torch.tensor([[0.1, 0.5, 0.9, float("nan")], [0.1, 0.5, 0.9, 0.3], [0.2, float("nan"), float("nan"), 0.4]])
    b = torch.tensor([[1.0, 2.0, 30.0, -5.0], [3.0, 2.0, 1.0, 2.5], [1.0, 1.0, 1.0, 1.0]])
    rho = analysis.rank_correlation(a, b)
    assert rho[0] == pytest.approx(1.0)  # the NaN neuron (dead) is left out: 1, 2, 30 rise with 0.1, 0.5, 0.9
    assert rho[1] == pytest.approx(-1.0)
    assert math.isnan(rho[2])  # two live neurons: too few to rank


def test_ipr_of_a_batchnorm_run_ranks_its_neurons_batchnorm_weights(tmp_path):
    """With BatchNorm, ipr.parquet has each neuron's BatchNorm weight, models.csv their rank correlation with the
    neurons' IPR (Fig. 5 of the paper), and ipr-vs-bn.png draws them."""
    out = tmp_path / "bn"
    args = ["train", "--p", "11", "--width", "16", "--xi", "0,0.2", "--steps", "60", "--batch-size", "16",
            "--batchnorm", "--log-every", "30", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["ipr", str(out)])
    assert result.exit_code == 0 and "bn_ipr_correlation" in result.output and (out / "ipr-vs-bn.png").is_file()
    table = pq.read_table(out / "ipr.parquet").to_pydict()
    rows = read_models(out)
    for r in rows:
        mine = [k for k, m in enumerate(table["model"]) if m == r.model and table["ipr"][k] is not None]
        ipr = torch.tensor([table["ipr"][k] for k in mine])[None]
        gamma = torch.tensor([abs(table["bn_weight"][k]) for k in mine])[None]
        assert r["bn_ipr_correlation"] == pytest.approx(analysis.rank_correlation(ipr, gamma)[0].item(), abs=1e-5)
