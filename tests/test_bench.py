import json

import pytest
from typer.testing import CliRunner

from fastgrok import bench
from fastgrok.cli import app
from fastgrok.errors import ConfigError


def test_bench_checks_then_times_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--p", "13", "--width", "8", "--models", "1,3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "All results match" in result.output
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["models"]): r for r in report["results"]}
    assert set(rows) == {("reference", 1), ("torch", 1), ("torch", 3), ("torch-vmap", 1), ("torch-vmap", 3)}
    assert all(r["model_steps_per_s"] > 0 and r["tflops"] > 0 for r in rows.values())
    # % of the fp32 peak measured in the same run (a 1024 x 1024 matmul on a CPU): one model of N 8 is far below it
    assert report["peaks_tflops"]["fp32"] > 0 and all(0 < r["percent_of_peak"] < 50 for r in rows.values())
    assert report["setting"]["train_examples"] == int(0.5 * 13 * 13) and report["versions"]["torch"]
    assert f"wrote {out} and {out.with_suffix('.png')}" in result.output
    assert out.with_suffix(".png").stat().st_size > 10_000  # model-steps/s against B, a line per variant


def test_bench_out_must_be_a_file_and_a_failed_write_leaves_no_temporary(tmp_path):
    from fastgrok.results import write_atomic

    result = CliRunner().invoke(app, ["bench", "--p", "7", "--width", "8", "--models", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: --out") and "is a directory" in result.output
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):  # renaming a file over a directory fails after the write
        write_atomic(tmp_path / "taken", lambda tmp: tmp.write_text("{}"))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["taken"]


def test_a_failing_variant_is_reported_and_the_rest_still_measured(monkeypatch):
    real = bench.check_variant

    def check(name, *args):
        if name == "torch-tf32":
            raise AssertionError("planted disagreement")
        return real(name, *args)

    monkeypatch.setattr(bench, "check_variant", check)
    report = bench.run(widths=[8], models=["2"], p=7, variants=("torch", "torch-tf32"), log=lambda *_: None)
    assert "planted" in report["failed"]["torch-tf32"]
    assert {r["backend"] for r in report["results"]} == {"reference", "torch"}


def test_a_variant_that_does_not_fit_is_reported_and_the_rest_still_measured(monkeypatch):
    """On a GPU a Triton variant can fit a width whose torch population does not: that variant is recorded as
    not fitting, not the whole benchmark lost. Here the planner refuses the second variant's population."""
    real, calls = bench.max_models, []

    def max_models(*args):
        calls.append(args)
        if len(calls) == 3:  # 1: the upfront check of width 8; 2: torch; 3: torch-tf32
            raise ConfigError("planted: does not fit")
        return real(*args)

    monkeypatch.setattr(bench, "max_models", max_models)
    report = bench.run(widths=[8], models=["2"], p=7, variants=("torch", "torch-tf32"), log=lambda *_: None)
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["torch"]["model_steps_per_s"] > 0
    assert rows["torch-tf32"]["note"] == "does not fit" and rows["torch-tf32"]["model_steps_per_s"] == 0


def _bench_script(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_summary_keeps_the_fastest_configuration_of_each_kind():
    """bench/sweep_blocks.py's summary of a sweep made up here: per kind (the forward in each example order, the
    backward per scatter, fused or in two launches) the configuration with the most model-steps/s."""
    sweep_blocks = _bench_script("sweep_blocks")
    tiles = [{"block_d": d, "block_n": 32, "num_warps": 4} for d in (16, 32, 64)]
    results = [{"forward_tiles": tiles[0], "model_steps_per_s": 10.0},
               {"forward_tiles": tiles[1], "model_steps_per_s": 30.0},
               {"forward_tiles": tiles[2], "scatter": "block", "model_steps_per_s": 50.0},
               {"backward_tiles": tiles[0], "scatter": "window", "fused": True, "model_steps_per_s": 20.0},
               {"backward_tiles": tiles[1], "scatter": "window", "fused": True, "model_steps_per_s": 5.0},
               {"backward_tiles": tiles[2], "scatter": "window", "fused": False, "model_steps_per_s": 7.0}]
    best = sweep_blocks.best(results)
    assert {kind: r["model_steps_per_s"] for kind, r in best.items()} == {
        "forward window": 30.0, "forward block": 50.0, "backward window fused": 20.0, "backward window two launches": 7.0}


def test_the_kernels_defaults_are_the_fastest_tiles_the_h100_sweep_measured():
    """kernels/forward.py TILES and the tf32 backward's default (one fused launch) are the configurations that ran
    fastest in the committed H100 sweep (N 512, B 1024, tf32, 2026-11-22), read from its JSON here."""
    import json
    from pathlib import Path

    from fastgrok.kernels import backward, forward

    sweep = json.loads((Path(__file__).resolve().parent.parent / "bench/results/h100-2026-11-22/sweep.json").read_text())
    window = [r for r in sweep["results"] if r.get("scatter", "window") == "window"]
    fastest_forward = max((r for r in window if "forward_tiles" in r), key=lambda r: r["model_steps_per_s"])
    fastest_backward = max((r for r in window if "backward_tiles" in r), key=lambda r: r["model_steps_per_s"])
    assert forward.TILES == fastest_forward["forward_tiles"]
    assert backward.default_step("tf32") == (fastest_backward["fused"], fastest_backward["backward_tiles"])


def test_the_targets_table_takes_each_variants_fastest_population_size():
    """bench/plot_bench.py's tables on a report made up here: each target against the fastest population size of
    its variant (a failed point, recorded at 0, never counts), a target with nothing measured said so, and per
    width the best Triton variant against the best PyTorch one beside the reference loop."""
    plot_bench = _bench_script("plot_bench")

    def row(backend, models, rate):
        return {"backend": backend, "width": 512, "models": models, "model_steps_per_s": rate}

    report = {"results": [row("reference", 1, 466.0), row("torch", 1024, 6_400.0), row("torch-tf32", 64, 7_500.0),
                          row("torch-tf32", 1024, 7_100.0), row("triton-tf32", 1024, 30_000.0),
                          row("triton-tf32", 14_810, 37_300.0), row("triton-tf32", 20_000, 0.0)]}
    targets = {("triton-tf32", 512): 150_000, ("triton-tf32", 2048): 40_000}
    lines = plot_bench.tables(report, targets).splitlines()
    assert "| N 512, triton-tf32: 150k | 37.3k (14810) | 4.0x |" in lines  # 150 / 37.3
    assert "| N 2048, triton-tf32: 40k | not measured |  |" in lines
    assert "| 512 | triton-tf32 37.3k (14810) | torch-tf32 7.5k (64) | 5.0x | 466 |" in lines  # 37.3 / 7.5


def _second_timing_raises(monkeypatch, error: BaseException) -> None:
    """Make the benchmark's second timed step raise `error`: the reference loop is timed first, then the torch
    backend's first population size (the peak's matmul, timed before both, is not counted)."""
    real, real_peaks, calls, peaking = bench._timed, bench.measure_peaks, [], []

    def peaks(*args, **kwargs):
        peaking.append(1)
        try:
            return real_peaks(*args, **kwargs)
        finally:
            peaking.pop()

    def timed(*args, **kwargs):
        calls.extend([] if peaking else [1])
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_timed", timed)
    monkeypatch.setattr(bench, "measure_peaks", peaks)


def test_an_interrupted_benchmark_keeps_the_results_measured_before_it(tmp_path, monkeypatch):
    """Ctrl-C (or a time limit's SIGINT) after the first result: the JSON holds it, marked interrupted; exit 130."""
    _second_timing_raises(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--p", "7", "--width", "8", "--models", "2", "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "Interrupted after 1 result" in result.output
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert [(r["backend"], r["models"]) for r in report["results"]] == [("reference", 1)]
    assert report["results"][0]["model_steps_per_s"] > 0
    assert out.with_suffix(".png").is_file()  # the figure of what was measured, too


def test_a_point_that_fails_is_recorded_in_strict_json_and_the_rest_measured(tmp_path, monkeypatch):
    """A population size that cannot run (a compile failure, say) is kept with its reason and no time: null, not
    Infinity, which strict JSON parsers refuse."""
    _second_timing_raises(monkeypatch, RuntimeError("planted failure"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--p", "7", "--width", "8", "--models", "1,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON: {name}"))
    rows = {(r["backend"], r["models"]): r for r in report["results"]}
    assert rows[("torch", 1)]["seconds_per_step"] is None and "planted failure" in rows[("torch", 1)]["note"]
    assert rows[("torch", 2)]["model_steps_per_s"] > 0 and rows[("reference", 1)]["model_steps_per_s"] > 0


def test_bench_takes_a_familys_settings_and_refuses_another_familys():
    report = bench.run(widths=[8], models=["2"], p=7, model="transformer", family_settings={"layers": 2, "heads": 2},
                       log=lambda *_: None)
    assert report["setting"] | {"layers": 2, "heads": 2} == report["setting"] and not report["failed"]
    assert {r["backend"] for r in report["results"]} == {"reference", "torch", "torch-vmap"}
    result = CliRunner().invoke(app, ["bench", "--model", "mlp", "--depth", "2", "--p", "7"])
    assert result.exit_code == 2 and result.output.strip() == "error: --depth is the deep-mlp model's option; this run's model is mlp"
    result = CliRunner().invoke(app, ["bench", "--model", "transformer", "--heads", "3", "--width", "16", "--p", "7"])
    assert result.exit_code == 2 and "--heads 3 does not divide d_model" in result.output
