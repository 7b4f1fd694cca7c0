import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from fastgrok import plots, reference
from fastgrok.backends import TorchBackend
from fastgrok.cli import app
from fastgrok.population import METRICS, Population
from fastgrok.results import MODEL_COLUMNS, read_config, read_models, read_weights, settings_of

runner = CliRunner()
SMALL = ["--p", "11", "--width", "8", "--steps", "30", "--log-every", "10"]


def run(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def test_a_log_file_gets_progress_lines(tmp_path, monkeypatch):
    """Redirected to a file (a batch job), the bar is drawn only at the end: plain progress lines come instead,
    and the line saying what trains is one line (a log is not wrapped at 80 columns, as rich wraps by default)."""
    monkeypatch.setattr("fastgrok.cli.PLAIN_PROGRESS_SECONDS", 0.0)
    result = run(*SMALL, "--xi", "0,0.3", "--wd", "0,5", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert re.search(r"^Training 4 models \(.*\) on .*, 30 steps, full batch.* -> .*run$", result.output, re.M), result.output
    assert re.search(r"^120 model-steps in .* s \(.*\)\. Results: .*run$", result.output, re.M), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("train ") and "elapsed" in line]
    assert [line.split()[3] for line in lines[:3]] == ["1/30,", "2/30,", "3/30,"]
    assert "step 30/30" in lines[-1] and "model-steps/s" in lines[-1]


def test_a_slow_rate_is_shown_not_rounded_to_zero():
    from fastgrok.cli import _rate

    assert [_rate(r) for r in (0.098, 3.456, 12.5, 37312.4)] == ["0.098", "3.5", "12", "37,312"]


def test_the_summary_table_says_when_each_model_first_reached_90_percent_test_accuracy():
    """The step column is models.csv's test90_step; a model that never got there has none, shown as a dash."""
    from dataclasses import replace

    from rich.console import Console

    from fastgrok.cli import _print_summary
    from fastgrok.config import Grid, Hyper
    from fastgrok.results import ModelRow
    from fastgrok.train import Run

    accs = {k: 0.5 for k in METRICS}
    steps = [1200, None, 12000, None]
    rows = [ModelRow(i, Hyper(xi=0.1 * i), accs, "forgetting", False, 10, None, s) for i, s in enumerate(steps)]
    console = Console(width=100, record=True)
    _print_summary(Run(Path("r"), rows, "complete", 1.0, 4, 4, 10), Grid.parse({"xi": "0,0.1,0.2,0.3"}), console)
    lines = [line.split() for line in console.export_text().splitlines() if "forgetting" in line]
    assert [cells[-2] for cells in lines] == ["1,200", "-", "12,000", "-"]
    # above 40 models, a row per phase: how many of its models reached 90% test accuracy, and the median step
    rows = [replace(rows[i % 4], model=i, hyper=Hyper(), phase="forgetting" if i < 40 else "coexistence",
                    test90_step=300 if i >= 40 else rows[i % 4].test90_step) for i in range(44)]
    console = Console(width=100, record=True)
    _print_summary(Run(Path("r"), rows, "complete", 1.0, 44, 44, 10), Grid.parse({"xi": "0"}), console)
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in console.export_text().splitlines() if line.count("│") == 5}
    assert cells == {"coexistence": ["4", "4", "300"], "forgetting": ["40", "20", "6,600"]}  # median of 1,200, 12,000


def test_the_summary_table_is_never_cut_to_fit_the_terminal(tmp_path, monkeypatch):
    """A grid of four axes needs more than the 100 columns a log file gets: every accuracy and phase is printed
    whole (rich squeezing the table cut them to "0.1…" and "forgetti…")."""
    monkeypatch.setenv("COLUMNS", "80")
    result = run(*SMALL, "--xi", "0,0.3", "--alpha", "0.3,0.7", "--dropout", "0,0.2", "--wd", "0,5",
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if re.match(r" *\d+ +\d", line)]
    assert len(rows) == 16 and "…" not in result.output, result.output
    models = {r["model"]: r for r in read_models(tmp_path / "run")}
    for cells in rows:
        m = models[int(cells[0])]
        assert cells[-1] == m["phase"] and cells[5] == f"{m['train_acc']:.3f}" and cells[6] == f"{m['test_acc']:.3f}"


def test_a_dry_run_prints_the_plan_a_run_then_follows_and_writes_nothing(tmp_path, monkeypatch):
    from fastgrok.config import Settings
    from fastgrok.planner import population_bytes

    # a model of the wider population with the larger set
    one = population_bytes(Settings(p=11), 12, int(0.6 * 121), 121, 1, TorchBackend(), device="cpu")
    monkeypatch.setattr("fastgrok.planner.memory_budget", lambda device: 5 * one)  # the planner splits
    monkeypatch.chdir(tmp_path)
    grid = [*SMALL, "--width", "8,12", "--xi", "0:0.5:6", "--alpha", "0.3,0.6"]
    result = run(*grid, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not any(tmp_path.iterdir())  # no runs/ directory, nothing written
    assert "24 models" in result.output and "720 model-steps" in result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if line.startswith("│")]
    assert [r[1] for r in rows].count("8") >= 1 and sum(int(r[2]) for r in rows) == 24
    units = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}
    assert all(float(r[4].split()[0]) * units[r[4].split()[1]] <= 5 * one * 1.001 for r in rows)  # within the budget
    assert run(*grid, "--out", tmp_path / "run").exit_code == 0
    assert read_config(tmp_path / "run")["populations"] == [int(r[2]) for r in rows]  # the plan shown is the plan run
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2 and "--dry-run plans a new run" in result.output


def test_train_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    result = run(*SMALL, "--xi", "0,0.3", "--wd", "0,1", "--out", out)
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert config["status"] == "complete" and config["models"] == 4
    assert config["settings"]["p"] == 11 and config["grid"]["xi"] == [0.0, 0.3]
    assert {"torch", "python", "fastgrok"} <= set(config["versions"]) and config["device"].startswith("cpu")
    header = (out / "models.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == MODEL_COLUMNS and b"\r" not in (out / "models.csv").read_bytes()
    rows = read_models(out)
    assert [r["model"] for r in rows] == [0, 1, 2, 3]
    assert [(r["xi"], r["wd"]) for r in rows] == [(0.0, 0.0), (0.0, 1.0), (0.3, 0.0), (0.3, 1.0)]
    history = pq.read_table(out / "history").to_pydict()
    assert sorted(set(history["step"])) == [0, 10, 20, 30]
    assert len(history["model"]) == 4 * 4 and set(METRICS) <= set(history)
    # the table printed is models.csv's: each model's phase and accuracies
    printed = {int(cells[0]): cells for cells in map(str.split, result.output.splitlines())
               if len(cells) == 10 and cells[0].isdigit()}
    assert {m: cells[-1] for m, cells in printed.items()} == {r.model: r.phase for r in rows}
    assert all(printed[r.model][3] == f"{r['train_acc']:.3f}" for r in rows)
    # the last logged metrics are the ones in models.csv
    for r in rows:
        i = [k for k, (m, s) in enumerate(zip(history["model"], history["step"])) if m == r["model"] and s == 30][0]
        assert history["test_acc"][i] == pytest.approx(r["test_acc"], abs=1e-6)


@pytest.mark.parametrize("extra", [[], ["--batchnorm", "--batch-size", "16"]])
def test_saved_weights_rebuild_every_model(tmp_path, extra):
    """Weights (with BatchNorm: its weight, bias and running statistics too) give back every model's metrics."""
    out = tmp_path / "run"
    assert run(*SMALL, *extra, "--xi", "0,0.5", "--width", "8,12", "--alpha", "0.4,0.6", "--out", out).exit_code == 0
    config, rows = read_config(out), {r["model"]: r for r in read_models(out)}
    assert config["populations"] == [4, 4]  # one population per width
    settings = settings_of(config)
    seen = 0
    for weights in read_weights(out):
        ids = weights["model"].tolist()
        pop = Population([rows[i].hyper for i in ids], settings, model_ids=ids)
        assert set(weights) == {"U", "V", "W", "model"} | ({"bn_weight", "bn_bias", "running_mean", "running_var"}
                                                            if extra else set())
        pop.load_weights(weights)
        metrics = pop.evaluate()
        for b, i in enumerate(ids):
            for k in ("train_acc", "test_acc", "clean_acc"):
                assert metrics[k][b].item() == pytest.approx(rows[i][k], abs=1e-6)
        seen += len(ids)
    assert seen == 8


def test_ctrl_c_keeps_what_was_done(tmp_path, ctrl_c_at_step):
    out = tmp_path / "run"
    ctrl_c_at_step(13)
    result = run(*SMALL, "--xi", "0,0.3", "--out", out)
    assert result.exit_code == 130
    assert "Interrupted" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "interrupted"
    rows = read_models(out)
    assert len(rows) == 2 and all(r["steps"] == 12 for r in rows)
    assert sorted(set(pq.read_table(out / "history").to_pydict()["step"])) == [0, 10, 12]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--p", "1"], "p must be at least 2"),
        (["--op", "div", "--p", "12"], "prime"),
        (["--xi", "1.5"], "--xi must be in [0, 1]"),
        (["--alpha", "1"], "--alpha must be in (0, 1)"),
        (["--alpha", "0"], "--alpha must be in (0, 1)"),
        (["--width", "0"], "--width must be at least 1"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--op", "pow"], "unknown op"),
        (["--act", "tanh"], "the mlp model takes --act quad, relu, pow, got 'tanh'"),
        (["--loss", "l1"], "unknown loss"),
        (["--optimizer", "lion"], "unknown optimizer"),
        (["--noise", "pink"], "unknown noise"),
        (["--xi", "0:0.5"], "cannot read"),
        (["--wd", "a,b"], "cannot read"),
        (["--width", "8.5"], "whole numbers"),
        (["--betas", "0.9"], "two numbers"),
        (["--device", "tpu"], "device"),
        (["--preset", "nope"], "unknown preset"),
        (["--data-seed", "-3"], "data-seed must be non-negative"),
        (["--backend", "jax"], "unknown backend"),
        (["--backend", "triton", "--precision", "fp8"], "unknown precision"),
        (["--precision", "fp8"], "unknown precision"),  # refused also where the torch backend would ignore it
        (["--backend", "triton", "--p", "521"], "p up to 512"),
        (["--width", "100000000"], "GiB"),
        (["--batch-size", "0"], "batch-size must be at least 1"),
        (["--batch-size", "1", "--batchnorm"], "at least 2 with BatchNorm"),
        (["--batch-size", "100"], "larger than the training set of alpha 0.5 (60 examples)"),
        (["--alpha", "0.5,0.001"], "alpha 0.001 leaves 0 of 121 pairs"),
        (["--backend", "triton", "--batchnorm"], "BatchNorm runs on --backend torch"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, message):
    result = run(*SMALL, *args, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists(), "bad input must be refused before the run writes anything"


@pytest.mark.parametrize("args, error", [
    (["--betas", "0.9"], "--betas takes two numbers, got '0.9'"),
    (["--log-every", "0"], "log-every must be at least 1, got 0"),
    (["--precision", "tf33"], "unknown precision"),
])
def test_bad_input_is_refused_before_the_default_preset_is_announced(tmp_path, args, error):
    result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.startswith(f"error: {error}"), result.output
    assert len(result.output.splitlines()) == 1, result.output


def test_existing_nonempty_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run(*SMALL, "--out", tmp_path)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [
    ["train", *SMALL, "--out"],
    ["analytic", "--p", "7", "--width", "8", "--out"],
    ["bench", "--p", "7", "--width", "8", "--models", "1", "--out"],
])
def test_an_unwritable_out_is_one_line_and_nonzero(tmp_path, command):
    (tmp_path / "file").write_text("a file, not a directory")
    out = tmp_path / "file" / "run"
    result = runner.invoke(app, [*map(str, command), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out.parent}"), result.output


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    run = scope["run"]
    assert run.status == "complete" and len(run.rows) == 16 and scope["history"].num_rows == 16 * 6
    assert {r["phase"] for r in run.rows if r["xi"] == 0 and r["wd"] == 5} == {"coexistence"}
    assert (tmp_path / "runs/python/phase-wd-vs-xi.png").is_file()
    assert (tmp_path / "runs/python/inverted_acc-wd-vs-xi.png").is_file()
    pop, mlp = scope["pop"], scope["mlp"]  # model 2 rebuilt: its metrics are models.csv's, its module is reference.py's
    assert pop.model_ids == [2] and float(pop.evaluate()["test_acc"][0]) == pytest.approx(run.rows[2]["test_acc"]) == 1.0
    assert isinstance(mlp, reference.MLP) and torch.equal(mlp.U.detach(), pop.U[0].T)
    x, z = pop.table
    assert (mlp(*x).argmax(-1) == z[0]).float().mean() > 0.95  # a generalising model: right on (nearly) every pair


def test_grid_of_reads_python_values_as_the_command_line_reads_its_options():
    import numpy as np

    from fastgrok.config import Grid
    from fastgrok.errors import ConfigError

    assert Grid.of(xi=np.linspace(0, 0.6, 13), wd=[0, 5, 15], seed=range(3), width=128) == \
        Grid.parse({"xi": "0:0.6:13", "wd": "0,5,15", "seed": "0:2:3", "width": "128"})
    assert Grid.of(xi=0.3).axes["xi"] == [0.3] and len(Grid.of(xi=[0, 0.3], lr=[1e-3, 1e-2])) == 4
    for bad, message in [({"xi": [0, 1.5]}, "--xi must be in [0, 1]"), ({"width": [64.5]}, "whole numbers"),
                         ({"beta": [1]}, "unknown grid axis"), ({"wd": []}, "cannot read")]:
        with pytest.raises(ConfigError) as error:
            Grid.of(**bad)
        assert message in str(error.value)


def test_settings_from_python_take_numpy_numbers_and_refuse_wrong_types(tmp_path):
    """Settings built in a notebook: numpy scalars train and are saved as numbers; a value of the wrong type is a
    ConfigError before anything is written, not a TypeError from inside the run."""
    import numpy as np

    from fastgrok.config import Grid, Settings
    from fastgrok.errors import ConfigError
    from fastgrok.results import read_config
    from fastgrok.train import train

    grid = Grid.of(xi=[0, 0.5], width=8)
    settings = Settings(p=np.int64(7), steps=np.int32(3), betas=np.array([0.9, 0.98]), data_seed=np.int64(1))
    assert train(grid, settings, tmp_path / "numpy", device="cpu").status == "complete"
    saved = read_config(tmp_path / "numpy")["settings"]
    assert (saved["p"], saved["steps"], saved["betas"], saved["data_seed"]) == (7, 3, [0.9, 0.98], 1)
    for bad, message in [({"p": "7"}, "p must be a whole number, got '7'"), ({"steps": 2.5}, "steps must be a whole"),
                         ({"batch_size": 4.0}, "batch-size must be a whole"), ({"betas": (0.9,)}, "two numbers"),
                         ({"eps": 0}, "eps must be a number in (0, 1)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            train(grid, Settings(**{"p": 7, **bad}), tmp_path / "bad", device="cpu")
        assert not (tmp_path / "bad").exists()


def test_the_commands_train_suggests_next_run(tmp_path):
    result = run(*SMALL, "--xi", "0,0.5", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    suggested = next(line for line in result.output.splitlines() if line.startswith("Next: "))
    for command in suggested.removeprefix("Next: ").split("; "):
        words = command.split()
        assert words[0] == "fastgrok"
        outcome = runner.invoke(app, words[1:])
        assert outcome.exit_code == 0, (command, outcome.output)


def test_version_presets_and_shim():
    assert "fastgrok" in runner.invoke(app, ["--version"]).output
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "cpu-demo" in result.output
    root = Path(__file__).resolve().parent.parent
    shim = subprocess.run([sys.executable, "cli.py", "train", "--help"], cwd=root, capture_output=True, text=True)
    assert shim.returncode == 0 and "--xi" in shim.stdout


def test_triton_backend_through_the_cli_matches_torch(tmp_path):
    pytest.importorskip("triton")
    args = ["--p", "7", "--width", "8", "--steps", "6", "--log-every", "3", "--xi", "0,0.4"]
    assert run(*args, "--backend", "torch", "--out", tmp_path / "torch").exit_code == 0
    result = run(*args, "--backend", "triton", "--out", tmp_path / "triton")
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "triton")["backend"] == "triton-tf32"  # the default precision (validated on a GPU)
    for a, b in zip(read_models(tmp_path / "torch"), read_models(tmp_path / "triton")):
        for k in ("train_acc", "test_acc", "clean_acc", "phase"):
            assert a[k] == b[k]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_a_precision_the_torch_backend_ignores_is_said(tmp_path):
    result = run(*SMALL, "--backend", "torch", "--precision", "bf16", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "--precision bf16 picks the Triton kernels' dot precision" in result.output
    assert read_config(tmp_path / "run")["backend"] == "torch"
    quiet = run(*SMALL, "--backend", "torch", "--out", tmp_path / "quiet")
    assert quiet.exit_code == 0 and "Triton kernels" not in quiet.output


def test_triton_on_a_cpu_without_the_interpreter_is_refused(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = run(*SMALL, "--backend", "triton", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "TRITON_INTERPRET=1" in result.output


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    import datetime

    from fastgrok.results import default_out_dir

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 23, 12, 0, 0)

    monkeypatch.setattr(datetime, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first = default_out_dir()
    assert first == Path("runs/20261123-120000") and first.is_dir()  # made, not only named
    assert [default_out_dir(), default_out_dir()] == [Path("runs/20261123-120000-1"), Path("runs/20261123-120000-2")]


@pytest.mark.parametrize("args", [["train", "--xi", "2"], ["train", "--p", "7", "--width", "10000000000"],
                                  ["analytic", "--p", "2"], ["analytic", "--width", "x"],
                                  ["train", "--p", "100000"], ["analytic", "--p", "100000"],
                                  ["bench", "--p", "100000"]])
def test_a_refused_run_leaves_no_directory_behind(tmp_path, monkeypatch, args):
    """Refused before anything is allocated or written: a p of 100,000 (10^10 pairs, 80 GB of indices alone) is
    measured by the planner, not built."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists()


def test_no_option_runs_the_cpu_preset_and_says_so(tmp_path, monkeypatch):
    from fastgrok import presets

    tiny = presets.Preset("a tiny stand-in for the test", axes={"xi": "0,0.5", "width": "8"}, settings={"p": 7, "steps": 3})
    monkeypatch.setitem(presets.PRESETS, "cpu-demo", tiny)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "No grid given: running preset 'cpu-demo'" in result.output and "Smaller than the paper" in result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = read_config(run_dir)
    assert config["settings"]["p"] == 7 and config["grid"]["xi"] == [0.0, 0.5]
    # an explicit option overrides the preset it was given with
    result = runner.invoke(app, ["train", "--preset", "cpu-demo", "--xi", "0.25", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0 and read_config(tmp_path / "b")["grid"]["xi"] == [0.25]


def _stop_at(monkeypatch, call: int, stop):
    """Make the torch backend call stop() at its call-th step (counting from 1); returns the call counter."""
    real_step, calls = TorchBackend.step, {"n": 0}

    def step(self, pop):
        calls["n"] += 1
        if calls["n"] == call:
            stop()
        return real_step(self, pop)

    monkeypatch.setattr(TorchBackend, "step", step)
    return calls


def _same_results(out, straight):
    assert (out / "models.csv").read_text() == (straight / "models.csv").read_text()
    resumed, reference = (pq.read_table(d / "history").to_pydict() for d in (out, straight))
    key = lambda h: sorted(zip(h["model"], h["step"], h["test_acc"], h["ipr"]))  # noqa: E731
    assert key(resumed) == key(reference)  # no leftover or missing rows


# two populations (one per width) of 30 steps; dropout, so the torch dropout streams must be saved too
RESUMABLE = [*SMALL, "--xi", "0,0.3", "--width", "8,12", "--dropout", "0.2"]


@pytest.mark.parametrize("extra", [[], ["--batchnorm", "--batch-size", "16"]])  # epochs of 3 batches
def test_resume_finishes_an_interrupted_run_with_the_results_of_an_uninterrupted_one(tmp_path, monkeypatch, extra):
    RESUMABLE = [*globals()["RESUMABLE"], *extra]
    assert run(*RESUMABLE, "--out", tmp_path / "straight").exit_code == 0

    def ctrl_c():
        raise KeyboardInterrupt

    _stop_at(monkeypatch, 43, ctrl_c)  # the first population is done, the second at step 12
    out = tmp_path / "resumed"
    result = run(*RESUMABLE, "--out", out)
    assert result.exit_code == 130 and "--resume" in result.output
    assert [r["steps"] for r in read_models(out)] == [30, 12, 30, 12]
    assert run("--resume", out, "--xi", "0.5").exit_code == 2  # the grid comes from the run
    calls = _stop_at(monkeypatch, 0, None)
    result = run("--resume", out)
    assert result.exit_code == 0, result.output
    assert "Resuming: 2 models of 4 left" in result.output
    assert calls["n"] == 18  # the unfinished population continued from step 12
    config = read_config(out)
    assert config["status"] == "complete" and len(config["resumed"]) == 1
    assert [w["models"] for w in config["written"]] == [[0, 2], [1, 3]]
    assert not list((out / "weights").glob("*.state.*"))  # finished populations keep no optimizer state
    _same_results(out, tmp_path / "straight")
    assert run("--resume", out).output.strip().endswith("nothing left to train.")


def test_resume_splits_the_grid_as_the_run_did(tmp_path, monkeypatch):
    """--population-size is part of the plan: a resumed run makes its populations of the same size again."""
    def ctrl_c():
        raise KeyboardInterrupt

    _stop_at(monkeypatch, 4, ctrl_c)  # populations of 5, 5 and 2 models: the first stopped at step 3
    out = tmp_path / "run"
    assert run(*SMALL, "--xi", "0,0.2,0.4,0.6,0.8,1", "--alpha", "0.3,0.6", "--population-size", "5", "--out",
               out).exit_code == 130
    assert read_config(out)["population_size"] == 5
    _stop_at(monkeypatch, 0, None)
    assert run("--resume", out).exit_code == 0
    assert [len(w["models"]) for w in read_config(out)["written"]] == [5, 5, 2]


def test_analysing_an_unfinished_run_says_what_is_not_trained_yet(tmp_path, monkeypatch):
    """Phases of an interrupted run are those of the step each model reached: the analysis says so, and how many
    models it left out because they never started; once the run is finished, nothing is said."""
    def ctrl_c():
        raise KeyboardInterrupt

    blanks = []  # the metric diagram's note of why cells are blank
    draw = plots.metric_heatmaps
    monkeypatch.setattr(plots, "metric_heatmaps", lambda *args, **kw: (blanks.append(kw["blank"]), draw(*args, **kw))[1])
    _stop_at(monkeypatch, 43, ctrl_c)  # widths 8 done, 12 at step 12, 16 not started
    out = tmp_path / "run"
    assert run(*SMALL, "--xi", "0,0.3", "--width", "8,12,16", "--out", out).exit_code == 130
    note = (f"note: this run is interrupted: of its 6 models, 2 part-trained (analysed at the step they reached) "
            f"and 2 not started (left out); `fastgrok train --resume {out}` finishes it")
    for command in (["phase", out], ["phase", out, "--metric", "test_acc"], ["plot", out, "--models", "0"],
                    ["ipr", out], ["prune", out, "--models", "0", "--every", "4"]):
        result = runner.invoke(app, list(map(str, command)))
        assert result.exit_code == 0 and result.output.rstrip().splitlines()[-1] == note, result.output
    _stop_at(monkeypatch, 0, None)
    assert run("--resume", out).exit_code == 0
    result = runner.invoke(app, ["phase", str(out)])
    assert result.exit_code == 0 and "note:" not in result.output
    assert runner.invoke(app, ["phase", str(out), "--metric", "test_acc"]).exit_code == 0
    assert blanks == ["blank: not trained", None]  # the width-16 row, until the run is finished


def test_the_prune_table_shows_an_empty_subsets_metric_as_a_dash(tmp_path):
    """At xi 0 there is no corrupted example to have memorised: prune's table says "-", as train's does, not nan."""
    out = tmp_path / "run"
    assert run(*SMALL, "--xi", "0,0.3", "--out", out).exit_code == 0
    result = runner.invoke(app, ["prune", str(out), "--every", "4"])
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in result.output.splitlines()
             if re.match(r"│ [01] ", line)]
    rows = {c[0]: c[1:5] for c in cells}  # test before, memorised before, test at half, memorised at half
    assert rows["0"][1] == rows["0"][3] == "-" and "nan" not in result.output
    assert all(re.fullmatch(r"\d\.\d{3}", v) for v in rows["0"][::2] + rows["1"])
    assert "pruning lowest-IPR neurons first (2 models)" in result.output
    result = runner.invoke(app, ["prune", str(out), "--every", "4", "--order", "random"])
    assert "pruning neurons in a random order (2 models)" in result.output


def test_a_run_being_written_is_refused_to_a_second_process(tmp_path, monkeypatch):
    from fastgrok.results import _lock

    def ctrl_c():
        raise KeyboardInterrupt

    _stop_at(monkeypatch, 5, ctrl_c)
    out = tmp_path / "run"
    assert run(*SMALL, "--out", out).exit_code == 130
    held = _lock(out)  # as a process still training it would (flock: per open file, so this process too)
    result = run("--resume", out)
    assert result.exit_code == 2 and result.output.startswith("error: ") and "being written by another" in result.output
    held.close()
    _stop_at(monkeypatch, 0, None)
    assert run("--resume", out).exit_code == 0


@pytest.mark.parametrize("log_every", [10, 1000])
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, log_every):
    """A population still training is saved on time, whether its step is logged or not (--log-every past --steps
    logs only the first and last step): a kill loses only the steps since its last save."""
    import fastgrok.train

    args = [*RESUMABLE, "--log-every", log_every]
    assert run(*args, "--out", tmp_path / "straight").exit_code == 0
    monkeypatch.setattr(fastgrok.train, "CHECKPOINT_SECONDS", 0.0)  # save after every step

    def crash():
        raise SystemExit(137)  # nothing is written after this: as if the process were killed

    _stop_at(monkeypatch, 56, crash)  # second population at its 26th step: last saved at step 25
    out = tmp_path / "killed"
    assert run(*args, "--out", out).exit_code == 137
    assert read_config(out)["status"] == "running"
    assert [w["steps"] for w in read_config(out)["written"]] == [30, 25]
    assert runner.invoke(app, ["ipr", str(out)]).exit_code == 0  # the saved state is no population of its own
    calls = _stop_at(monkeypatch, 0, None)
    assert run("--resume", out).exit_code == 0
    assert calls["n"] == 5  # steps 26..30 of the second population
    _same_results(out, tmp_path / "straight")


def test_an_analysis_rewriting_models_csv_during_training_loses_no_row(tmp_path, monkeypatch):
    """`fastgrok ipr RUN` on a run still training reads models.csv, and writes it back with its columns later,
    perhaps after training added a population's rows: the finished run must still hold every row."""
    from fastgrok.analysis import update_models_csv
    from fastgrok.results import RunWriter

    assert run(*RESUMABLE, "--out", tmp_path / "straight").exit_code == 0
    real = RunWriter.add_population

    def add_population(self, rows, *args, **kwargs):
        stale = (self.out / "models.csv").read_text()  # the analysis reads...
        name = real(self, rows, *args, **kwargs)
        (self.out / "models.csv").write_text(stale)  # ...and writes after training did
        update_models_csv(self.out, {"mean_ipr": {0: 0.5}})
        return name

    monkeypatch.setattr(RunWriter, "add_population", add_population)
    out = tmp_path / "run"
    assert run(*RESUMABLE, "--out", out).exit_code == 0
    _same_results(out, tmp_path / "straight")


@pytest.mark.parametrize("presses, saved", [(1, [30, 13, 30, 13]), (2, [30, 30])])
def test_ctrl_c_during_an_optimizer_update_saves_no_half_updated_model(tmp_path, monkeypatch, presses, saved):
    """A real Ctrl-C lands between any two Python operations: here after U's update and before V's and W's.
    Pressed once, the step in flight finishes before the population is saved; twice, the run stops at once and
    the population in flight is not saved (it trains again). Either way the run resumes to the uninterrupted
    result."""
    import os
    import signal

    import fastgrok.optim

    assert run(*RESUMABLE, "--out", tmp_path / "straight").exit_code == 0
    real, calls = fastgrok.optim.step_, {"n": 0}

    def step_(name, params, grads, exp_avgs, exp_avg_sqs, *rest, **kwargs):
        calls["n"] += 1
        if calls["n"] != 43:  # the second population's 13th step
            return real(name, params, grads, exp_avgs, exp_avg_sqs, *rest, **kwargs)
        real(name, params[:1], grads[:1], exp_avgs[:1], exp_avg_sqs[:1], *rest, **kwargs)
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        real(name, params[1:], grads[1:], exp_avgs[1:], exp_avg_sqs[1:], *rest, **kwargs)

    monkeypatch.setattr(fastgrok.optim, "step_", step_)
    out = tmp_path / "resumed"
    result = run(*RESUMABLE, "--out", out)
    assert result.exit_code == 130 and "--resume" in result.output and "Stopping after the step" in result.output
    assert [r["steps"] for r in read_models(out)] == saved
    assert f"Interrupted: 2 of 4 models finished, {len(saved) - 2} saved part-trained" in result.output
    monkeypatch.setattr(fastgrok.optim, "step_", real)
    assert run("--resume", out).exit_code == 0
    _same_results(out, tmp_path / "straight")


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path, monkeypatch):
    """Killed halfway through writing a population's files, the run keeps whole files only: the last
    checkpoint's, whose weights and optimizer state belong to the same step."""
    import fastgrok.results
    import fastgrok.train

    assert run(*RESUMABLE, "--out", tmp_path / "straight").exit_code == 0
    monkeypatch.setattr(fastgrok.train, "CHECKPOINT_SECONDS", 0.0)  # save after every step
    real = fastgrok.results.save_file

    def save_file(tensors, path):
        if "exp_avg.U" in tensors and tensors["model"].tolist() == [1, 3] and int(tensors["step"]) == 20:
            with open(path, "wb") as f:  # the second population's checkpoint at step 20: killed mid-write
                f.write(b"\0" * 100)
            raise SystemExit(137)
        real(tensors, path)

    monkeypatch.setattr(fastgrok.results, "save_file", save_file)
    out = tmp_path / "killed"
    assert run(*RESUMABLE, "--out", out).exit_code == 137
    assert [w["steps"] for w in read_config(out)["written"]] == [30, 19]
    monkeypatch.setattr(fastgrok.results, "save_file", real)
    result = run("--resume", out)
    assert result.exit_code == 0, result.output
    _same_results(out, tmp_path / "straight")
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]


def test_sigterm_saves_like_ctrl_c(tmp_path, monkeypatch):
    import os
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _stop_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "run"
    result = run(*SMALL, "--out", out)
    assert result.exit_code == 130 and "Interrupted" in result.output
    # the signal came as the 5th step began: that step finished, then the population was saved
    assert read_config(out)["status"] == "interrupted" and [r["steps"] for r in read_models(out)] == [5]
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are gone with the run


@pytest.mark.parametrize("given, used", [([], "bf16"), (["--precision", "fp32"], "fp32")])
def test_resume_keeps_the_runs_precision_unless_one_is_given(tmp_path, monkeypatch, given, used):
    import fastgrok.train

    def ctrl_c():
        raise KeyboardInterrupt

    _stop_at(monkeypatch, 5, ctrl_c)
    out = tmp_path / "run"
    assert run(*SMALL, "--out", out).exit_code == 130
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] is None  # the torch backend's
    (out / "config.json").write_text(json.dumps({**config, "backend": "triton-bf16", "precision": "bf16"}))
    asked = []
    real = fastgrok.train.make_backend
    monkeypatch.setattr(fastgrok.train, "make_backend",
                        lambda name, dev, precision=None, settings=None: asked.append(precision) or real("torch", dev))
    _stop_at(monkeypatch, 0, None)
    assert run("--resume", out, *given).exit_code == 0
    assert asked == [used]


def test_the_run_records_where_its_seconds_went(tmp_path):
    assert run(*SMALL, "--xi", "0,0.3", "--width", "8,12", "--out", tmp_path / "run").exit_code == 0
    config = read_config(tmp_path / "run")
    split = config["time_split"]
    assert set(split) == {"setup", "steps", "logging", "saving"} and all(v > 0 for v in split.values())
    assert sum(split.values()) == pytest.approx(config["seconds"], rel=0.05, abs=0.02)
