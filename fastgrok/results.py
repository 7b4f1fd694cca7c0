"""A run directory: what a finished (or interrupted) run leaves behind.

    config.json                  the resolved grid and settings, status, versions, device, git revision
    models.csv                   one row per model: model, grid axes, final metrics, phase
    history/pop000.parquet ...   every metric of every model at every logged step (pd.read_parquet(run / "history"))
    weights/pop000.safetensors   U (B, p, N), V (B, p, N), W (B, N, p) and the model ids of each population
                                 (and with BatchNorm its weight, bias and running statistics, (B, N) each)

    weights/pop000.state.safetensors   what continuing a population that has not finished needs (interrupted,
                                 or checkpointed during a long run): its weights, optimizer moments, step and dropout
                                 streams, all of one step; deleted when it finishes

Each population's files are written when it finishes, when the run is interrupted (Ctrl-C, SIGTERM) and every
few minutes while it trains, so an interrupted or killed run keeps its work; config.json lists the files written
("written") and `RunWriter.reopen` continues from them (--resume), an unfinished population from its last state.
Every file is written beside its place under a hidden temporary name and then renamed over it, so a run killed
mid-write keeps the previous whole file, never a torn one. A writing process holds a lock on .lock.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastgrok import __version__
from fastgrok.config import AXES, Grid, Hyper, Settings
from fastgrok.errors import ConfigError
from fastgrok.population import METRICS

MODEL_COLUMNS = ("model", *AXES, "train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc",
                 "train_loss", "phase", "test_loss", "diverged", "steps", "train90_step", "test90_step")


def default_out_dir(root: Path = Path("runs")) -> Path:
    """A new directory runs/<timestamp>, made here: runs started in the same second (a job array) each get their
    own (-1, -2, ...), where checking names first and creating later would give two of them the same."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for k in itertools.count():
        out = root / (f"{stamp}-{k}" if k else stamp)
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new directory")


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """What a benchmark ran on: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:  # Linux: "model name : AMD EPYC" (platform gives only x86_64)
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def versions() -> dict:
    out = {"fastgrok": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def csv_cell(v, column: str = ""):
    """A value as a csv cell: NaN empty, a grid value in full (config.json's 12 digits: 1/30 is not 0.0333333),
    any other float to 6 digits."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{12 if column in AXES else 6}g}"
    return v


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a hidden file beside `path`, then rename it over `path`: readers (and a run killed
    mid-write) see the old file or the new one. The '.' keeps pyarrow's dataset discovery and our globs off it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except Exception:  # a write that failed (disk full, path a directory...) leaves nothing behind; a kill
        tmp.unlink(missing_ok=True)  # does, and reopening the run deletes it
        raise


def write_csv(path: Path, rows) -> None:
    """A csv file (header first, then rows of cells), through write_atomic. Lines end in LF, not the csv module's
    CRLF, so that cut and awk do not carry a carriage return in the last column."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)

    write_atomic(path, write)


def _lock(out: Path):
    """An exclusive lock on out/.lock, held while a process writes the run: a second writer (a --resume of a run
    still training, two runs given one --out) is refused instead of writing over the same files. Where the
    filesystem has no locks (some network mounts), or the OS no fcntl, nothing is locked."""
    handle = open(out / ".lock", "w")
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"{out} is being written by another fastgrok process; let it finish or stop it first") from None
    except (ImportError, OSError):
        pass
    return handle


def check_not_busy(run: Path) -> None:
    """Refuse a run another process is writing before anything is printed (RunWriter.reopen locks it for good)."""
    _lock(run).close()


class RunWriter:
    def __init__(self, out: Path, grid: Grid, settings: Settings, device: torch.device, backend: str,
                 extra: dict | None = None):
        check_out_dir(out)
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.lock = _lock(out)
        (out / "history").mkdir(parents=True, exist_ok=True)
        (out / "weights").mkdir(exist_ok=True)
        self.config = {
            "status": "running",
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "grid": grid.axes,
            "models": len(grid),
            "settings": asdict(settings),
            "device": device_name(device),
            "backend": backend,
            "versions": versions(),
            "git": git_revision(),
            "command": sys.argv,
            **(extra or {}),
        }
        self.config["written"] = []  # one entry per population file, in the order they were written
        self.populations = 0
        self.rows: dict[int, list[str]] = {}  # models.csv, written whole from here: training owns the file
        self.write_config()
        self._write_models()

    @classmethod
    def reopen(cls, out: Path, steps: int) -> tuple["RunWriter", set[int], list[dict]]:
        """Continue an interrupted run: keep the populations that finished all `steps` and those saved with
        their state (to continue from it), delete the files and rows of any other. Returns the writer, the ids
        of the models done, and the "written" entries of the populations to continue."""
        self = cls.__new__(cls)
        self.out, self.config = Path(out), read_config(out)
        self.lock = _lock(self.out)
        for tmp in (*self.out.glob(".*.tmp"), *self.out.glob("*/.*.tmp")):  # a write the kill cut short
            tmp.unlink()
        written = self.config.get("written", [])
        partial = [w for w in written if w["steps"] < steps and w.get("state") and self._state_path(w["name"]).is_file()]
        kept = [w for w in written if w["steps"] == steps] + partial
        for w in written:
            if w not in kept:
                for path in (self.out / "history" / f"{w['name']}.parquet",
                             self.out / "weights" / f"{w['name']}.safetensors", self._state_path(w["name"])):
                    path.unlink(missing_ok=True)
        done = {m for w in kept if w["steps"] == steps for m in w["models"]}
        # only the training columns: what `fastgrok ipr` added describes weights that training is about to change
        keep = done | {m for w in partial for m in w["models"]}
        with open(self.out / "models.csv", newline="") as f:
            self.rows = {int(r["model"]): [r.get(c, "") for c in MODEL_COLUMNS] for r in csv.DictReader(f)
                         if int(r["model"]) in keep}  # .get: a run written before a column was added
        self._write_models()
        self.config.update(status="running", written=kept)
        self.config.setdefault("resumed", []).append(datetime.datetime.now().isoformat(timespec="seconds"))
        self.populations = 1 + max((int(w["name"][3:]) for w in kept), default=-1)
        self.write_config()
        return self, done, partial

    def write_config(self) -> None:
        write_atomic(self.out / "config.json", lambda tmp: tmp.write_text(json.dumps(self.config, indent=2) + "\n"))

    def _state_path(self, name: str) -> Path:
        return self.out / "weights" / f"{name}.state.safetensors"

    def _write_models(self) -> None:
        """models.csv from the rows written so far, in model order. Never read back while training, so an
        analysis command run on the run meanwhile (which rewrites models.csv with its columns) loses no row."""
        write_csv(self.out / "models.csv", [MODEL_COLUMNS, *(self.rows[m] for m in sorted(self.rows))])

    def new_name(self) -> str:
        self.populations += 1
        return f"pop{self.populations - 1:03d}"

    def add_population(self, rows: list[dict], history: dict[str, np.ndarray], weights: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor] | None = None, name: str | None = None) -> str:
        """Write a population's history, weights and (unfinished) state, then its models.csv rows, then its entry
        in config.json, each file whole (`write_atomic`): a run killed in between is repaired by `reopen`, which
        trusts config.json's entries alone, and continues from a state file, which holds everything of one step.
        Writing under a `name` already written replaces that population's files, rows and entry."""
        name = name or self.new_name()
        ids = [int(r["model"]) for r in rows]
        write_atomic(self.out / "history" / f"{name}.parquet", lambda tmp: pq.write_table(pa.table(history), tmp))
        # a state holds the weights too: each tensor is copied to the host once
        host = {k: v.detach().cpu().contiguous() for k, v in {**weights, **(state or {})}.items()}
        for tensors, path in ((weights, self.out / "weights" / f"{name}.safetensors"), (state, self._state_path(name))):
            if tensors is not None:
                write_atomic(path, lambda tmp: save_file({k: host[k] for k in tensors}, str(tmp)))  # noqa: B023
        self.rows |= {int(row["model"]): [csv_cell(row[c], c) for c in MODEL_COLUMNS] for row in rows}
        self._write_models()
        entry = {"name": name, "models": ids, "steps": int(rows[0]["steps"]) if rows else 0, "state": state is not None}
        self.config["written"] = [w for w in self.config["written"] if w["name"] != name] + [entry]
        self.write_config()
        if state is None:
            self._state_path(name).unlink(missing_ok=True)
        return name

    def finish(self, status: str, **extra) -> None:
        """Mark the run finished (or interrupted), models.csv written once more whole."""
        self._write_models()
        self.config.update(status=status, finished=datetime.datetime.now().isoformat(timespec="seconds"), **extra)
        self.write_config()
        self.close()

    def close(self) -> None:
        """Let another process write the run (the lock goes with the process too, however it ends)."""
        self.lock.close()


# ---- reading a run back ---------------------------------------------------------------------------------


def read_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run} is not a fastgrok run directory (no config.json)")
    return json.loads(path.read_text())


def read_models(run: Path) -> list[dict]:
    """models.csv as a list of dicts with numbers parsed (empty cells are NaN), and each model's grid values
    exactly as config.json's grid has them: runs written before 2026-11-23 rounded them to 6 digits in models.csv,
    which split a diagram's cells (xi 0.0333333 is not the grid's 0.0333333333333) and could rebuild a training
    split other than the one trained on."""
    path = Path(run) / "models.csv"
    if not path.is_file():
        raise ConfigError(f"{run} is not a fastgrok run directory (no models.csv)")
    hypers = Grid(read_config(run)["grid"]).models()
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = {}
            for k, v in row.items():
                if k in ("phase",):
                    out[k] = v
                elif k == "diverged":
                    out[k] = v == "True"
                elif k in ("model", "width", "seed", "steps", "dead_neurons"):
                    out[k] = int(v)
                else:
                    out[k] = float(v) if v != "" else math.nan
            exact = asdict(hypers[out["model"]]) if 0 <= out["model"] < len(hypers) else None
            if exact is None or not all(math.isclose(out[a], exact[a], rel_tol=1e-5) for a in AXES):
                raise ConfigError(f"{path}: model {out['model']} is not the grid's model {out['model']} in config.json")
            out.update(exact)
            rows.append(out)
    return rows


def read_history(run: Path) -> pa.Table:
    return pq.read_table(Path(run) / "history")


# Analysis reads a run's weights a piece at a time, whole models of at most this many bytes: its memory does not
# grow with the run (8,192 models of N 512 hold 4.9 GB of U, V, W; one piece of them 0.26 GB).
READ_BYTES = 256 << 20


def read_weights(run: Path, models: set[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The run's weights when asked for: dicts of U, V, W, model (and BatchNorm's tensors), each of one
    population's models, at most READ_BYTES of them. With `models`, only their rows are read, a run of
    consecutive rows at a time, and a population file holding none of them no further than its model ids (a
    model per phase of a 1,156-model run at N 500: 3 MB, not 670)."""
    for f in sorted((Path(run) / "weights").glob("pop*.safetensors")):
        if f.name.endswith(".state.safetensors"):
            continue
        with safe_open(str(f), framework="pt") as saved:
            ids = saved.get_tensor("model")
            names = [name for name in saved.keys() if name != "model"]
            rows = torch.arange(len(ids)) if models is None else torch.tensor(
                [m in models for m in ids.tolist()], dtype=torch.bool).nonzero().flatten()
            if len(rows) == 0:
                continue
            model_bytes = 4 * sum(math.prod(saved.get_slice(name).get_shape()[1:]) for name in names)
            for piece in rows.split(max(1, READ_BYTES // model_bytes)):
                runs = torch.tensor_split(piece, (piece.diff() != 1).nonzero().flatten() + 1)
                yield {"model": ids[piece], **{name: torch.cat([saved.get_slice(name)[int(r[0]):int(r[-1]) + 1]
                                                                for r in runs]) for name in names}}


def read_population(run: Path, name: str) -> tuple[dict[str, torch.Tensor], pa.Table]:
    """An unfinished population's state (Population.state()) and history, to continue it. A state file written
    before states held the weights (fastgrok 0.1.0 before 2026-11-23) takes them from the weights file."""
    weights = Path(run) / "weights"
    state = load_file(str(weights / f"{name}.state.safetensors"))
    if "U" not in state:
        state = {**load_file(str(weights / f"{name}.safetensors")), **state}
    return state, pq.read_table(Path(run) / "history" / f"{name}.parquet")


def settings_of(config: dict) -> Settings:
    s = dict(config["settings"])
    s["betas"] = tuple(s["betas"])
    return Settings(**s)


def recipe(config: dict) -> str:
    """A run's training recipe in a line: the grid axes all its models share, steps and batches, and the settings
    that differ from the paper's defaults."""
    settings, grid = settings_of(config), config["grid"]
    parts = [f"p {settings.p}", *(f"{a} {v[0]:g}" for a, v in grid.items() if len(v) == 1 and a != "seed"),
             f"{settings.steps} steps", settings.batching]
    parts += [f"{k} {getattr(settings, k)}" for k in ("op", "act", "loss", "optimizer", "noise")
              if getattr(settings, k) != getattr(Settings(), k)]
    return ", ".join(parts)


def hyper_of(row: dict) -> Hyper:
    return Hyper(**{a: row[a] for a in AXES})


HISTORY_COLUMNS = ("model", "step", *METRICS, "ipr")  # ipr: mean neuron IPR of the model


def load_populations(run: Path, device: str | torch.device = "cpu", models: set[int] | None = None):
    """The run's trained models as Populations (restricted to `models`; a saved population in pieces of
    read_weights' size), weights loaded, data splits rebuilt from the seeds. Yields them one at a time to bound
    memory."""
    from fastgrok.population import Population

    settings = settings_of(read_config(run))
    rows = {r["model"]: r for r in read_models(run)}
    wanted = set(rows) if models is None else set(models) & set(rows)
    for weights in read_weights(run, wanted):
        ids = weights["model"].tolist()
        pop = Population([hyper_of(rows[m]) for m in ids], settings, device, model_ids=ids)
        pop.load_weights(weights)
        yield pop
