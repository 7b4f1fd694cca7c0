"""Partial and damaged runs, full disks, huge grids: each case is reproduced first (a killed run, a damaged file, a
writer that raises ENOSPC), then it must end in a one-line error (exit 2) or the right result, losing nothing that
was saved."""

import json
import shutil

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

import fastgrok.results as results
from fastgrok.cli import app
from fastgrok.config import Grid, Hyper, Settings
from fastgrok.results import RunWriter, read_config, read_models

runner = CliRunner()
SMALL = ["--p", "11", "--steps", "30", "--log-every", "10"]
TWO = [*SMALL, "--xi", "0,0.3", "--width", "8,12"]  # two populations (one per width) of two models
ANALYSES = [["ipr"], ["prune", "--every", "4"], ["phase"], ["plot"], ["plot", "--models", "all"]]


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def one_line_error(result, *words):
    """The output ends in one line of error, after at most what a training printed before it failed."""
    lines = result.output.rstrip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 2 and errors == lines[-1:], result.output
    assert all(line.startswith(("Training ", "Resuming: ", "Note: ", "━")) for line in lines[:-1]), result.output
    assert "Traceback" not in result.output and all(w in lines[-1] for w in words), result.output
    return lines[-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every repaired one must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run("train", *TWO, "--out", out).exit_code == 0
    return out


def same_results(out, straight):
    assert (out / "models.csv").read_text() == (straight / "models.csv").read_text()
    for path in ("weights/pop000.safetensors", "weights/pop001.safetensors", "history/pop000.parquet",
                 "history/pop001.parquet"):
        assert (out / path).read_bytes() == (straight / path).read_bytes(), path


def started_not_saved(out):
    """A run as a kill before its first save leaves it: config.json (running) and models.csv's header."""
    grid = Grid.parse({"xi": "0,0.3", "width": "8"})
    RunWriter(out, grid, Settings(p=11, steps=30, log_every=10), __import__("torch").device("cpu"), "torch").close()


@pytest.mark.parametrize("command", ANALYSES)
def test_analysing_a_run_with_nothing_saved_says_so(tmp_path, command):
    out = tmp_path / "run"
    started_not_saved(out)
    one_line_error(run(*command, out), "holds no trained model yet", "killed or crashed", "--resume")


def test_a_run_still_training_is_told_from_a_dead_one(tmp_path):
    out = tmp_path / "run"
    started_not_saved(out)
    held = results._lock(out)  # as the process training it holds it
    one_line_error(run("ipr", out), "holds no trained model yet", "still training")
    held.close()
    assert "killed or crashed" in run("check", out).output


def test_files_written_before_config_lists_them_are_left_out_then_removed(tmp_path, straight):
    """A kill between writing a population's files and listing it in config.json: analysis reads what config.json
    lists (the other models are not started), and resume removes the unlisted files and trains them again."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    config = read_config(out)
    (out / "config.json").write_text(json.dumps({**config, "status": "running", "written": config["written"][:1]}))
    result = run("ipr", out)
    assert result.exit_code == 0 and "2 not started" in result.output, result.output
    assert [r.model for r in read_models(out)] == [0, 2]
    check = run("check", out).output
    assert "2 of 4 models trained" in check and "leftover:" in check and "pop001.safetensors" in check
    assert run("train", "--resume", out).exit_code == 0
    same_results(out, straight)
    assert "every file intact" in run("check", out).output and "leftover" not in run("check", out).output


def no_space(on_name):
    """save_file that fails as safetensors does on a full disk when it writes `on_name`'s file."""
    real = results.save_file

    def save_file(tensors, path):
        if on_name in str(path):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        real(tensors, path)

    return save_file


@pytest.mark.parametrize("ctrl_c", [False, True])
def test_a_full_disk_is_one_line_that_says_what_was_kept(tmp_path, straight, monkeypatch, ctrl_c, ctrl_c_at_step):
    """The second population's weights do not fit (after Ctrl-C at its 5th step, or at its end): one line naming
    the file and what is kept; config.json says interrupted; the first population is whole and resume finishes."""
    if ctrl_c:
        ctrl_c_at_step(35)  # the second population's 5th step
    monkeypatch.setattr(results, "save_file", no_space("pop001"))
    out = tmp_path / "run"
    line = one_line_error(run("train", *TWO, "--out", out), "weights/pop001.safetensors: No space left on device",
                          "Kept: 2 of 4 models trained and 0 saved part-trained", "config.json says 'interrupted'",
                          f"`fastgrok train --resume {out}`")
    assert "Free some space" in line
    assert read_config(out)["status"] == "interrupted" and not list(out.rglob(".*.tmp"))
    assert [r.model for r in read_models(out)] == [0, 2]
    monkeypatch.undo()
    assert run("train", "--resume", out).exit_code == 0
    same_results(out, straight)


def test_a_disk_too_full_for_config_json_says_so(tmp_path, monkeypatch):
    """The disk fills as the first population's weights are written, and config.json cannot be rewritten either."""
    real, full = results.write_atomic, {"now": False}

    def write_atomic(path, write):
        full["now"] = full["now"] or path.name == "pop000.safetensors"
        if full["now"]:
            raise OSError(28, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(results, "write_atomic", write_atomic)
    one_line_error(run("train", *SMALL, "--width", "8", "--out", tmp_path / "run"), "No space left on device",
                   "config.json could not be updated and still says 'running'")


DAMAGES = {  # what is done to a copy of a finished run -> the file the error names
    "models.csv cut mid-line": (lambda out: (out / "models.csv").write_text((out / "models.csv").read_text()[:-30]),
                                "models.csv"),
    "a models.csv row missing": (lambda out: (out / "models.csv").write_text(
        "".join(line for line in (out / "models.csv").read_text().splitlines(True) if not line.startswith("3,"))),
        "models.csv has no row for model 3"),
    "weights deleted": (lambda out: (out / "weights/pop001.safetensors").unlink(), "pop001.safetensors is missing"),
    "weights cut short": (lambda out: (out / "weights/pop001.safetensors").write_bytes(
        (out / "weights/pop001.safetensors").read_bytes()[:500]), "pop001.safetensors is damaged"),
    "history cut short": (lambda out: (out / "history/pop000.parquet").write_bytes(
        (out / "history/pop000.parquet").read_bytes()[:300]), "pop000.parquet is damaged"),
    "history folder deleted": (lambda out: shutil.rmtree(out / "history"), "history/pop000.parquet is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_population_file_is_named_and_resume_retrains_it(tmp_path, straight, damage):
    do, names = DAMAGES[damage]
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    do(out)
    for command in ANALYSES:
        one_line_error(run(*command, out), names, f"`fastgrok train --resume {out}` retrains it")
    check = run("check", out)
    assert check.exit_code == 2 and "damaged: " in check.output and names in check.output, check.output
    result = run("train", "--resume", out)
    assert result.exit_code == 0 and "trains again" in result.output, result.output
    same_results(out, straight)


def test_a_damaged_state_is_named_and_its_population_trained_again(tmp_path, straight, monkeypatch, ctrl_c_at_step):
    """An interrupted population continues from its state file; cut short, that file is named and resume trains
    the population from its seeds instead."""
    ctrl_c_at_step(35)  # Ctrl-C at the second population's 5th step
    out = tmp_path / "run"
    assert run("train", *TWO, "--out", out).exit_code == 130
    monkeypatch.undo()
    state = out / "weights/pop001.state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    for command in ANALYSES:
        one_line_error(run(*command, out), "pop001.state.safetensors is damaged", "--resume")
    result = run("train", "--resume", out)
    assert result.exit_code == 0 and "pop001.state.safetensors is damaged" in result.output, result.output
    same_results(out, straight)


@pytest.mark.parametrize("damage, names", [
    (lambda out: (out / "config.json").write_text((out / "config.json").read_text()[:200]), "config.json is damaged"),
    (lambda out: (out / "config.json").write_text(json.dumps({**read_config(out), "grid": None})), "config.json"),
    (lambda out: (out / "config.json").write_text("{}"), "config.json is damaged (no 'grid')"),
    (lambda out: (out / "models.csv").write_bytes(b"\x00\xff garbage\n" * 5), "models.csv is damaged"),
    (lambda out: (out / "models.csv").unlink(), "models.csv is missing"),
])
def test_a_damaged_index_is_named_with_restore_as_the_fix(tmp_path, straight, damage, names):
    """config.json and models.csv index the whole run: damaged, nothing is retrained over them; restore them."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    damage(out)
    for command in [*ANALYSES, ["train", "--resume"], ["check"]]:
        one_line_error(run(*command, out), names, "restore it from a copy")
    assert (out / "weights" / "pop000.safetensors").read_bytes() == (straight / "weights/pop000.safetensors").read_bytes()


def test_a_kill_after_the_last_save_is_repaired_by_resume(tmp_path, straight):
    """Killed after the last population's final save, before config.json said complete and before its state file
    was removed: resume marks the run complete and removes the state, training nothing."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "config.json").write_text(json.dumps({**read_config(out), "status": "running"}))
    shutil.copy(out / "weights/pop001.safetensors", out / "weights/pop001.state.safetensors")
    result = run("train", "--resume", out)
    assert result.exit_code == 0 and result.output.rstrip().endswith("nothing left to train."), result.output
    assert "marked complete" in result.output and "removed 1 leftover file" in result.output
    assert read_config(out)["status"] == "complete" and not (out / "weights/pop001.state.safetensors").exists()
    same_results(out, straight)


def test_whole_numbers_of_a_grid_stay_exact(tmp_path):
    """Seeds beyond 2^53 are whole numbers, not floats rounded together; seeds past 2^63 (the random streams' key)
    are refused."""
    grid = Grid.parse({"seed": "9007199254740992,9007199254740993"})
    assert grid.axes["seed"] == [9007199254740992, 9007199254740993]
    from fastgrok.population import Population

    pop = Population(grid.models(), Settings(p=7), "cpu")
    assert not __import__("torch").equal(pop.U[0], pop.U[1])
    one_line_error(run("train", "--p", "7", "--seed", "0,18446744073709551616", "--out", tmp_path / "r"),
                   "--seed must be in [0, 2^63)")
    one_line_error(run("train", "--p", "7", "--width", "8.5", "--out", tmp_path / "r"), "--width takes whole numbers")
    assert not (tmp_path / "r").exists()


def test_a_grid_too_large_for_the_disk_or_memory_is_refused_with_the_numbers(tmp_path, monkeypatch):
    """10^8 models: counted from the axes, refused before any is built, with what it would take."""
    import fastgrok.planner as planner

    monkeypatch.setattr(Grid, "models", lambda self: pytest.fail("the grid's models were listed"))
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    huge = ["train", "--xi", "0:1:10000", "--alpha", "0.1:0.9:10000", "--dry-run"]
    one_line_error(run(*huge), "100,000,000 models would write about 53.1 TiB", "52.9 TiB of weights", "1.0 TiB free")
    monkeypatch.setattr(planner, "host_memory", lambda: 16 << 30)
    one_line_error(run(*huge, "--p", "7", "--width", "4"), "100,000,000 models: their models.csv rows alone take about "
                   "190.7 GiB", "more than the 16.0 GiB available")


def test_a_million_models_are_planned_without_listing_them(monkeypatch):
    """The dry-run of 10^6 small models builds only the few it times: the planner works on the axes."""
    import fastgrok.planner as planner

    monkeypatch.setattr(Grid, "models", lambda self: pytest.fail("the grid's models were listed"))
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 50, 0, 1 << 50))
    monkeypatch.setattr(planner, "host_memory", lambda: 1 << 40)
    result = run("train", "--xi", "0:1:1000", "--alpha", "0.1:0.9:1000", "--p", "7", "--width", "4", "--steps", "10",
                 "--device", "cpu", "--dry-run")
    assert result.exit_code == 0 and "1,000,000 models" in result.output, result.output
    assert "estimated time" in result.output and "The run writes about" in result.output


def test_a_hyper_is_read_from_the_grid_by_its_index():
    grid = Grid.parse({"xi": "0,0.1,0.2", "wd": "0,5", "seed": "0,1,2", "width": "8,16"})
    assert [grid.model(i) for i in range(len(grid))] == grid.models()
    assert grid.model(len(grid) - 1) == Hyper(xi=0.2, width=16, wd=5.0, seed=2)


def test_a_write_that_fails_names_its_file_and_leaves_nothing_behind(tmp_path):
    """pyarrow reports a full disk as an OSError without a file name ("Error writing bytes to file"): the error
    names the file it was writing, in the system's words, and no temporary file stays."""
    def write(tmp):
        tmp.write_bytes(b"part")
        raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    with pytest.raises(OSError) as caught:
        results.write_atomic(tmp_path / "history.parquet", write)
    assert caught.value.filename == str(tmp_path / "history.parquet")
    assert caught.value.strerror == "No space left on device" and not list(tmp_path.iterdir())
