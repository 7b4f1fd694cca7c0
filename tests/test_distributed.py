"""One run over several processes: the plan's populations shared among them (planner.shares), decided from the
plan alone, shown by `fastgrok train --dry-run --world-size K`, and `python -m fastgrok`, the entry point a
launcher such as torchrun starts."""

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from fastgrok import planner
from fastgrok.backends import TorchBackend
from fastgrok.cli import app
from fastgrok.config import Grid, Settings

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


def fastgrok(*args, launcher=(sys.executable, "-m", "fastgrok"), check=True, **kwargs):
    import os

    return subprocess.run([*launcher, *map(str, args)], env={**os.environ, **ENV}, capture_output=True, text=True,
                          check=check, **kwargs)


def same_files(a, b):
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_processes_write_the_run_one_process_writes(tmp_path):
    import json

    grid = ["train", "--p", "11", "--width", "8,12", "--xi", "0,0.3", "--alpha", "0.3,0.6", "--steps", "30",
            "--log-every", "10"]
    fastgrok(*grid, "--out", tmp_path / "one")
    result = fastgrok(*grid, "--out", tmp_path / "two", launcher=TORCHRUN)
    same_files(tmp_path / "one", tmp_path / "two")
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["status"] == "complete" and config["processes"] == 2
    assert [w["name"] for w in config["written"]] == ["pop000", "pop001"]
    assert result.stdout.count("Results:") == 1 and "8 models" in result.stdout  # process 0 reports, for all


def test_a_dry_run_under_the_launcher_prints_every_processs_share_once(tmp_path):
    result = fastgrok("train", "--p", "11", "--width", "8,12,16", "--xi", "0,0.3", "--dry-run", launcher=TORCHRUN)
    assert result.stdout.count("3 population(s) shared by 2 processes") == 1, result.stdout
    assert not any(tmp_path.iterdir())


def test_a_process_killed_mid_run_loses_only_its_population_in_flight(tmp_path):
    """SIGKILL to the second process: torchrun stops the first, which saves its population where it is; a plain
    --resume on one process then finishes the run as an uninterrupted one."""
    import json
    import os
    import signal
    import time

    if not os.path.exists("/proc/self/environ"):
        pytest.skip("finds the second process by its environment in /proc")
    grid = ["train", "--p", "13", "--width", "8,12", "--xi", "0,0.3", "--alpha", "0.3,0.6", "--steps", "6000",
            "--log-every", "1000"]
    fastgrok(*grid, "--out", tmp_path / "straight")
    launcher = subprocess.Popen([*TORCHRUN, *grid, "--out", str(tmp_path / "run")], env={**os.environ, **ENV},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    for _ in range(600):  # the second process, once it has started training (its run directory is announced)
        time.sleep(0.05)
        for pid in os.listdir("/proc"):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except (OSError, ValueError):
                continue
            if b"RANK=1" in environ and str(tmp_path).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                second = int(pid)
        if second is not None and (tmp_path / "run" / "config.json").exists():
            break
    assert second is not None
    time.sleep(1.0)
    os.kill(second, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "interrupted" and all(w["steps"] < 6000 for w in config["written"])
    fastgrok("train", "--resume", tmp_path / "run")
    same_files(tmp_path / "straight", tmp_path / "run")


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
