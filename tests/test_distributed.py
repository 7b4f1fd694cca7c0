"""One run over several processes: the plan's populations shared among them (planner.shares), decided from the
plan alone, shown by `fastgrok train --dry-run --world-size K`, and `python -m fastgrok`, the entry point a
launcher such as torchrun starts."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from fastgrok import planner
from fastgrok.backends import TorchBackend
from fastgrok.cli import app
from fastgrok.config import Grid, Settings
from fastgrok.errors import ConfigError

runner = CliRunner()


def planned(budget_models: int = 5):
    """A grid of 3 widths x 2 training-set sizes, split by a budget of a few models into 2 to 3 populations a width."""
    grid = Grid.of(xi=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], alpha=[0.3, 0.9], width=[8, 16, 32])
    settings = Settings(p=13, steps=100)
    one = planner.population_bytes(settings, 32, int(0.9 * 169), 169, 1, TorchBackend(), device="cpu")
    return planner.plan(grid, settings, torch.device("cpu"), TorchBackend(), budget_models * one), settings


@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_every_population_goes_to_one_process_and_the_loads_balance(processes):
    populations, settings = planned()
    ranks = planner.shares(populations, settings, processes)
    assert len(ranks) == len(populations) and all(0 <= r < processes for r in ranks)
    costs = [p.cost(settings) for p in populations]
    loads = [sum(c for c, r in zip(costs, ranks) if r == k) for k in range(processes)]
    # most costly first to the least loaded: no process ends more than one population above the mean
    assert max(loads) <= sum(costs) / processes + max(costs)
    if processes <= len(populations):
        assert min(loads) > 0  # no process idle while another holds two populations
    assert planner.shares(populations, settings, processes) == ranks  # the plan alone decides


def test_the_most_costly_go_first_each_to_the_least_loaded_process():
    class Costs:  # a population of a given cost
        def __init__(self, cost):
            self.cost = lambda settings: cost

    assert planner.shares([Costs(c) for c in (5, 1, 1, 1, 1, 1)], None, 2) == [0, 1, 1, 1, 1, 1]
    assert planner.shares([Costs(c) for c in (1, 2, 3, 4)], None, 2) == [0, 1, 1, 0]  # 4 + 1 against 3 + 2
    assert planner.shares([Costs(2), Costs(2)], None, 3) == [0, 1]  # ties: the earlier population, the lower rank


def test_a_populations_cost_is_its_flops_over_the_steps():
    populations, settings = planned()
    for p in populations:
        flops = sum(6 * group.d * p.width * settings.p * (stop - start) for group, start, stop in p.parts)
        assert p.cost(settings) == settings.steps * flops  # the MLP's 6 D N p a model-step
    widest = max(populations, key=lambda p: (p.width, len(p)))
    assert widest.cost(settings) == max(p.cost(settings) for p in populations if len(p) == len(widest))


def test_the_dry_run_shows_each_process_its_populations(tmp_path):
    args = ["train", "--p", "11", "--steps", "30", "--width", "8,16,24", "--xi", "0:0.5:4", "--dry-run"]
    result = runner.invoke(app, [*args, "--world-size", "2"])
    assert result.exit_code == 0, result.output
    assert "3 population(s) shared by 2 processes" in result.output
    tables = result.output.split("per process")
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in tables[0].splitlines() if line.startswith("│")]
    assert sorted(int(r[0]) for r in rows) == [0, 1, 2] and {r[1] for r in rows} == {"0", "1"}
    assert rows[2][1] == "0"  # the widest population is the most costly: the first process takes it
    per_process = [[c.strip() for c in line.split("│")[1:-1]] for line in tables[1].splitlines() if line.startswith("│")]
    assert [r[0] for r in per_process] == ["0", "1"]
    assert sum(int(r[1]) for r in per_process) == 3 and sum(int(r[2]) for r in per_process) == 12
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--world-size", "2"], "--world-size goes with --dry-run"),
    (["--world-size", "0", "--dry-run"], "--world-size must be at least 1, got 0"),
])
def test_a_bad_world_size_is_one_line(args, message):
    result = runner.invoke(app, ["train", "--p", "7", "--xi", "0", "--steps", "2", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_python_m_fastgrok_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "fastgrok", "presets"], capture_output=True, text=True, check=True)
    assert "transformer-cpu" in out.stdout and "cpu-demo" in out.stdout


ENV = {"OMP_NUM_THREADS": "1"}  # one thread a process, the same in the single-process run compared against
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastgrok"]
FILES = ["models.csv", "history/pop000.parquet", "history/pop001.parquet", "weights/pop000.safetensors",
         "weights/pop001.safetensors"]
# long enough to stop in the middle (about 5 s on one core), two populations of 4 models
LONG = ["train", "--p", "13", "--width", "8,12", "--xi", "0,0.3", "--alpha", "0.3,0.6", "--steps", "6000",
        "--log-every", "1000"]


def fastgrok(*args, launcher=(sys.executable, "-m", "fastgrok"), check=True, **kwargs):
    return subprocess.run([*launcher, *map(str, args)], env={**os.environ, **ENV}, capture_output=True, text=True,
                          check=check, **kwargs)


def same_files(a, b):
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """LONG trained without a stop, on one process."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fastgrok(*LONG, "--out", out)
    return out


def test_two_processes_write_the_run_one_process_writes(tmp_path):
    grid = ["train", "--p", "11", "--width", "8,12", "--xi", "0,0.3", "--alpha", "0.3,0.6", "--steps", "30",
            "--log-every", "10"]
    fastgrok(*grid, "--out", tmp_path / "one")
    result = fastgrok(*grid, "--out", tmp_path / "two", launcher=TORCHRUN)
    same_files(tmp_path / "one", tmp_path / "two")
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["status"] == "complete" and config["processes"] == 2
    assert [w["name"] for w in config["written"]] == ["pop000", "pop001"]
    assert result.stdout.count("Results:") == 1 and "8 models" in result.stdout  # process 0 reports, for all
    # each process's own log names the population it trained; the journal goes once everything is recorded
    logs = {k: (tmp_path / "two" / "logs" / f"process-{k}.log").read_text() for k in (0, 1)}
    assert "pop001: finished" in logs[0] and "pop000: finished" in logs[1] and "complete" in logs[1], logs
    assert not list((tmp_path / "two" / "logs").glob("*.jsonl"))


def test_a_dry_run_under_the_launcher_prints_every_processs_share_once(tmp_path):
    result = fastgrok("train", "--p", "11", "--width", "8,12,16", "--xi", "0,0.3", "--dry-run", launcher=TORCHRUN)
    assert result.stdout.count("3 population(s) shared by 2 processes") == 1, result.stdout
    assert not any(tmp_path.iterdir())


def processes(tmp_path, count=2, after=None):
    """The pids of the launched processes whose command line names tmp_path, by rank, once they train (the run's
    config.json is written) and, if given, once `after` exists."""
    found = {}
    for _ in range(600):
        time.sleep(0.05)
        for pid in os.listdir("/proc"):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except (OSError, ValueError):
                continue
            rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None and str(tmp_path).encode() in cmdline and b"fastgrok" in cmdline:
                found[rank] = int(pid)
        if len(found) == count and (tmp_path / "run" / "config.json").exists() and (after is None or after.exists()):
            return found
    raise AssertionError(f"the launched processes were not found: {found}")


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/environ"),
                                reason="finds the launched processes by their environment in /proc")


@needs_proc
def test_a_process_killed_mid_run_loses_only_its_population_in_flight(tmp_path, straight):
    """SIGKILL to the second process: torchrun stops the first, which saves its population where it is; a plain
    --resume on one process then finishes the run as an uninterrupted one."""
    launcher = subprocess.Popen([*TORCHRUN, *LONG, "--out", str(tmp_path / "run")], env={**os.environ, **ENV},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = processes(tmp_path)
    time.sleep(1.0)
    os.kill(pids[1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "interrupted" and all(w["steps"] < 6000 for w in config["written"])
    assert [w["name"] for w in config["written"]] == ["pop001"]  # the first process's, saved as it stopped
    fastgrok("train", "--resume", tmp_path / "run")
    same_files(straight, tmp_path / "run")


@needs_proc
def test_sigterm_to_the_launcher_saves_every_process_and_resume_on_two_finishes(tmp_path, straight):
    """A scheduler's SIGTERM to torchrun reaches every process, each saves its population at the step it reached;
    `torchrun ... train --resume` on two processes continues each from there."""
    launcher = subprocess.Popen([*TORCHRUN, *LONG, "--out", str(tmp_path / "run")], env={**os.environ, **ENV},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes(tmp_path)
    time.sleep(1.0)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) != 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "interrupted"
    assert sorted(w["name"] for w in config["written"]) == ["pop000", "pop001"]
    assert all(0 < w["steps"] < 6000 and w["state"] for w in config["written"])
    result = fastgrok("train", "--resume", tmp_path / "run", launcher=TORCHRUN)
    assert result.stdout.count("Results:") == 1
    same_files(straight, tmp_path / "run")
    log = (tmp_path / "run" / "logs" / "process-1.log").read_text()
    assert "from its save at step" in log, log  # the second attempt continued, not restarted


@needs_proc
def test_torchrun_max_restarts_resumes_after_process_0_is_lost(tmp_path, straight):
    """Process 0 killed (its node lost): the second process's save after that is in its journal, not yet in
    config.json; torchrun restarts both processes, which find the run their launch began and resume it."""
    restarting = [*TORCHRUN[:3], "--max-restarts", "1", *TORCHRUN[3:]]
    launcher = subprocess.Popen([*restarting, *LONG, "--out", str(tmp_path / "run")], env={**os.environ, **ENV},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = processes(tmp_path)
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    output = launcher.communicate(timeout=240)[0]
    assert launcher.returncode == 0, output
    assert "Resuming" in output and output.count("Results:") == 1, output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "complete" and len(config["resumed"]) == 1
    same_files(straight, tmp_path / "run")
    log = (tmp_path / "run" / "logs" / "process-0.log").read_text() + (tmp_path / "run" / "logs" / "process-1.log").read_text()
    assert "pop000: 4 models of width 8, from its save at step" in log, log  # the journalled save, continued


def test_a_journalled_population_process_0_did_not_record_is_kept(tmp_path):
    """What another process saved after process 0 stopped is in its journal only: inspect_run counts it and
    resume records it, trained, instead of training it again."""
    from fastgrok import results

    grid = ["train", "--p", "7", "--width", "6,8", "--xi", "0,0.2", "--steps", "20", "--log-every", "10"]
    fastgrok(*grid, "--out", tmp_path / "run")
    run, before = tmp_path / "run", (tmp_path / "run" / "models.csv").read_text()
    config = json.loads((run / "config.json").read_text())
    lost = config["written"].pop()  # as if process 1 wrote it, and process 0 stopped before recording it
    rows = {int(r[0]): r for r in csv.reader(before.splitlines()[1:])}
    cells = [[int(c) if c.isdigit() else c for c in rows[m]] for m in lost["models"]]
    (run / "logs").mkdir()
    (run / "logs" / "process-1.saves.jsonl").write_text(
        json.dumps({"kind": "population", **lost, "cells": cells}) + "\n" + '{"kind": "popul')  # a torn last line
    config["status"] = "interrupted"
    (run / "config.json").write_text(json.dumps(config))
    (run / "models.csv").write_text("\n".join(l for l in before.splitlines()
                                              if l.split(",")[0] not in map(str, lost["models"])) + "\n")
    found = results.inspect_run(run)
    assert len(found.finished) == 2 and not found.problems and not found.orphans
    result = fastgrok("train", "--resume", run)
    assert "is complete: nothing left to train" in result.stdout
    assert (run / "models.csv").read_text() == before
    assert json.loads((run / "config.json").read_text())["status"] == "complete"
    assert not (run / "logs" / "process-1.saves.jsonl").exists()


def test_processes_that_disagree_on_the_command_are_refused_in_one_line(tmp_path):
    """The second process given other settings (here --steps) says so on one line; the launcher stops the run."""
    script = tmp_path / "disagree.py"
    script.write_text(
        "import os, sys\n"
        "from fastgrok.cli import app\n"
        f"steps = '30' if os.environ['RANK'] == '0' else '40'\n"
        f"sys.argv = ['fastgrok', 'train', '--p', '11', '--width', '8,12', '--xi', '0', '--steps', steps, "
        f"'--out', {str(tmp_path / 'run')!r}]\n"
        "app()\n")
    result = fastgrok(script, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", "2"], check=False)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "process 1 differs from process 0 in its settings" in lines[0], lines


@pytest.mark.parametrize("env, place", [
    ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, (2, 4, 0)),  # torchrun
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
      "SLURM_NTASKS": "8"}, (5, 8, 1)),  # a task of `srun -n 8`
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, (0, 1, 0)),  # the batch script itself
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
      "SLURM_PROCID": "3"}, (1, 2, 1)),  # torchrun started by srun: torchrun's numbering
])
def test_a_process_knows_its_place_from_torchrun_or_srun(monkeypatch, env, place):
    from fastgrok import distributed

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert distributed.launched() == place


@pytest.mark.parametrize("nodes, first", [("vm", "vm"), ("gpu[03-05,09],cpu1", "gpu03"), ("n01,n02", "n01"),
                                          ("a[1-2]-ib", "a1-ib"), ("rack[2,4]x[1-3]", "rack2x1")])
def test_the_store_goes_on_the_first_node_of_the_slurm_list(nodes, first):
    from fastgrok import distributed

    assert distributed.first_listed(nodes) == first


def slurm_answers() -> bool:
    """srun on the path is not enough: its controller must answer and have a node up."""
    if shutil.which("sinfo") is None:
        return False
    try:
        nodes = subprocess.run(["sinfo", "--noheader", "--responding", "--format", "%D"], capture_output=True,
                               text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return nodes.returncode == 0 and any(int(n) > 0 for n in nodes.stdout.split() if n.isdigit())


@pytest.mark.skipif(shutil.which("srun") is None, reason="needs a SLURM cluster (srun)")
def test_srun_tasks_write_the_run_one_process_writes(tmp_path):
    if not slurm_answers():
        pytest.skip("srun is installed but no SLURM controller answers with a node up")
    grid = ["train", "--p", "11", "--width", "8,12", "--xi", "0,0.3", "--alpha", "0.3,0.6", "--steps", "30",
            "--log-every", "10"]
    fastgrok(*grid, "--out", tmp_path / "one")
    srun = ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--kill-on-bad-exit=1", sys.executable, "-m", "fastgrok"]
    result = fastgrok(*grid, "--out", tmp_path / "two", launcher=srun, timeout=300)
    same_files(tmp_path / "one", tmp_path / "two")
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["processes"] == 2 and config["launcher"].startswith("slurm:")
    assert result.stdout.count("Results:") == 1


def test_a_device_too_small_for_its_share_is_refused_before_training(monkeypatch):
    """Process 0 plans on its own device; another whose device holds less says so before it trains."""
    populations, settings = planned()
    grid = populations[0].parts[0][0].grid
    widest = max(populations, key=lambda p: planner.job_bytes(grid, settings, p.ids(), TorchBackend(), torch.device("cpu")))
    need = planner.job_bytes(grid, settings, widest.ids(), TorchBackend(), torch.device("cpu"))
    monkeypatch.setattr(planner, "memory_budget", lambda device: need)
    planner.check_fits([p.ids() for p in populations], grid, settings, TorchBackend(), torch.device("cpu"), "process 3")
    monkeypatch.setattr(planner, "memory_budget", lambda device: need - 1)
    with pytest.raises(ConfigError, match=f"process 3 on cpu cannot hold its population of {len(widest)} models"):
        planner.check_fits([p.ids() for p in populations], grid, settings, TorchBackend(), torch.device("cpu"),
                           "process 3")


def test_processes_on_different_kinds_of_device_are_refused():
    from fastgrok import distributed

    w = distributed.World(rank=2, size=4)
    distributed.check_agrees(w, {"device": "cuda"}, {"device": "cuda"})
    with pytest.raises(ConfigError, match="process 2 differs from process 0 in its kind of device"):
        distributed.check_agrees(w, {"device": "cuda"}, {"device": "cpu"})


def test_population_size_splits_a_grid_for_more_processes():
    """One width of 24 models fits one population; a launcher's 3 processes would leave 2 idle, which the plan
    says, with the --population-size that gives each process a few populations."""
    args = ["train", "--p", "11", "--width", "8", "--xi", "0:0.5:24", "--steps", "30", "--dry-run", "--world-size", "3"]
    result = runner.invoke(app, args)
    assert "2 of the 3 processes have no population to train (the plan has 1): --population-size 2" in result.output
    result = runner.invoke(app, [*args, "--population-size", "8"])
    assert "3 population(s) shared by 3 processes" in result.output and "no population" not in result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.split("per process")[0].splitlines()
            if line.startswith("│")]
    assert [int(r[3]) for r in rows] == [8, 8, 8] and sorted(r[1] for r in rows) == ["0", "1", "2"]
    result = runner.invoke(app, [*args, "--population-size", "0"])
    assert result.exit_code == 2 and "--population-size must be at least 1, got 0" in result.output


def test_uneven_shares_are_said_with_the_size_that_evens_them():
    """Four populations of costs 4, 1, 1, 1 on 2 processes: 4 against 3, the mean 3.5; 1, 1, 1, 1 even."""
    assert planner.share_notes([4, 1, 1, 1], 2, 80) == [
        "the most loaded process has 14% more work than the mean, and the run waits for it: --population-size 10 "
        "gives each process a few populations to even out"]
    assert planner.share_notes([1, 1, 1, 1], 2, 80) == [] and planner.share_notes([4, 1], 1, 80) == []


def test_population_size_bounds_every_population_and_keeps_each_model_once():
    grid = Grid.of(xi=[0.0, 0.1, 0.2, 0.3, 0.4], alpha=[0.3, 0.6, 0.9], width=[8, 16])
    settings = Settings(p=13, steps=10)
    populations = planner.plan(grid, settings, torch.device("cpu"), TorchBackend(), most=4)
    assert all(len(p) <= 4 and {grid.model(i).width for i in p.ids()} == {p.width} for p in populations)
    assert sorted(i for p in populations for i in p.ids()) == list(range(len(grid)))
