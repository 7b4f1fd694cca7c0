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
