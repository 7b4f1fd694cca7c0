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

A run trained by several processes (fastgrok.distributed) also holds, under logs/, each process's log and, until
the run completes or is resumed, the journal of the populations the processes other than 0 saved: what process 0
records in config.json and models.csv, kept in case it stopped before recording it.
"""

from __future__ import annotations

import csv
import datetime
import errno
import itertools
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fastgrok import __version__
from fastgrok.config import AXES, Grid, Hyper, Settings, axis_text
from fastgrok.device import device_name
from fastgrok.errors import ConfigError
from fastgrok.families import FAMILIES
from fastgrok.population import METRICS

MODEL_COLUMNS = ("model", *AXES, "train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc",
                 "train_loss", "phase", "test_loss", "diverged", "steps", "train90_step", "test90_step")
JOURNALS = "logs/*.saves.jsonl"  # one per process other than 0 (distributed.RankWriter)
INT_COLUMNS = ("model", "width", "seed", "steps", "train90_step", "test90_step", "dead_neurons")


@dataclass(frozen=True)
class ModelRow:
    """One line of models.csv: a model's grid point, its final metrics (METRICS), phase, steps trained, and the
    first logged steps at which train and test accuracy reached 90%. A missing value is None in every column
    (an accuracy over an empty subset, a level never reached) and an empty cell in the file. `extra` holds the
    columns analysis commands add (`fastgrok ipr`: mean_ipr, high_ipr_fraction, dead_neurons). A column is read
    by name: row["test_acc"], row["xi"], row["mean_ipr"]."""

    model: int
    hyper: Hyper
    metrics: dict
    phase: str
    diverged: bool
    steps: int
    train90_step: int | None
    test90_step: int | None
    extra: dict = field(default_factory=dict)

    def __getitem__(self, column: str):
        if column in self.metrics:
            return self.metrics[column]
        if column in AXES:
            return getattr(self.hyper, column)
        if column in self.extra:
            return self.extra[column]
        return getattr(self, column)

    def __contains__(self, column: str) -> bool:
        return column in MODEL_COLUMNS or column in self.extra

    def cells(self) -> list:
        """The row as models.csv writes it, in MODEL_COLUMNS order."""
        return [csv_cell(self[c], c) for c in MODEL_COLUMNS]

    @classmethod
    def from_cells(cls, cells: dict[str, str], hyper: Hyper) -> "ModelRow":
        """A row read back from models.csv: numbers parsed, empty cells None; the grid values are `hyper`'s."""
        value = {c: (None if v == "" else v == "True" if c == "diverged" else v if c in ("phase", "op")
                     else int(v) if c in INT_COLUMNS else float(v)) for c, v in cells.items()}
        known = set(MODEL_COLUMNS)
        return cls(model=value["model"], hyper=hyper, metrics={k: value[k] for k in METRICS}, phase=value["phase"],
                   diverged=value["diverged"], steps=value["steps"], train90_step=value["train90_step"],
                   test90_step=value["test90_step"], extra={k: v for k, v in value.items() if k not in known})


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
    """A value as a csv cell: None or NaN empty, a grid value to 12 digits (1/30 is not 0.0333333), any other
    float to 6 digits."""
    if v is None:
        return ""
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
    except Exception as e:  # a write that failed (disk full, path a directory...) leaves nothing behind; a kill
        tmp.unlink(missing_ok=True)  # does, and reopening the run deletes it
        if isinstance(e, SafetensorError):  # safetensors reports a full disk in its own words, as no OSError
            full = "No space left" in str(e) or "StorageFull" in str(e)
            raise OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else str(e),
                          str(path)) from e
        if isinstance(e, OSError) and e.filename is None:  # pyarrow's names no file
            raise OSError(e.errno, os.strerror(e.errno) if e.errno else str(e), str(path)) from e
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


def write_population(out: Path, name: str, history: dict[str, np.ndarray], weights: dict[str, torch.Tensor],
                     state: dict[str, torch.Tensor] | None = None) -> None:
    """A population's history, weights and (unfinished) state files, each written whole."""
    write_atomic(out / "history" / f"{name}.parquet", lambda tmp: pq.write_table(pa.table(history), tmp))
    # a state holds the weights too: each tensor is copied to the host once
    host = {k: v.detach().cpu().contiguous() for k, v in {**weights, **(state or {})}.items()}
    for tensors, path in ((weights, out / "weights" / f"{name}.safetensors"),
                          (state, out / "weights" / f"{name}.state.safetensors")):
        if tensors is not None:
            write_atomic(path, lambda tmp: save_file({k: host[k] for k in tensors}, str(tmp)))  # noqa: B023


def written_entry(name: str, cells: list[list], steps: int, state: bool) -> dict:
    """A population's entry in config.json's "written": its name, model ids (from its models.csv rows), the step
    it reached and whether it left a state to continue from."""
    return {"name": name, "models": [int(row[0]) for row in cells], "steps": steps, "state": state}


class RunWriter:
    def __init__(self, out: Path, grid: Grid, settings: Settings, device: torch.device, backend: str,
                 precision: str | None = None, extra: dict | None = None):
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
            "precision": precision,  # the fused kernels' dot precision (None: the torch backend's fp32)
            "versions": versions(),
            "git": git_revision(),
            "command": sys.argv,
            **(extra or {}),
        }
        self.config["written"] = []  # one entry per population file, in the order they were written
        self.names: set[str] = set()  # population names given out
        self.rows: dict[int, list[str]] = {}  # models.csv, written whole from here: training owns the file
        self.write_config()
        self._write_models()

    @classmethod
    def reopen(cls, found: "Inspection", out: Path) -> "RunWriter":
        """Continue the interrupted run `found` (inspect_run of `out`): keep the populations that finished and
        those saved part-trained with their state, delete every other population file and any orphan (a write a
        kill cut short, a state left behind by a finished population), and rewrite models.csv with the kept
        populations' rows (only training's columns: what `fastgrok ipr` added describes weights that training is
        about to change)."""
        self = cls.__new__(cls)
        self.out, self.config = Path(out), found.config
        self.lock = _lock(self.out)
        kept = found.populations
        for path in found.orphans:
            path.unlink(missing_ok=True)
        for w in found.config["written"]:
            if w not in kept:
                for path in (self.out / "history" / f"{w['name']}.parquet",
                             self.out / "weights" / f"{w['name']}.safetensors", self._state_path(w["name"])):
                    path.unlink(missing_ok=True)
        self.rows = {m: row.cells() for m, row in found.rows.items()}
        self._write_models()
        self.config.update(status="running", written=[w for w in found.config["written"] if w in kept])
        self.config.setdefault("resumed", []).append(datetime.datetime.now().isoformat(timespec="seconds"))
        self.names = {w["name"] for w in kept}
        for folder in ("history", "weights"):
            (self.out / folder).mkdir(exist_ok=True)
        self.write_config()
        self._drop_journals()  # what they held is in config.json now
        return self

    def write_config(self) -> None:
        write_atomic(self.out / "config.json", lambda tmp: tmp.write_text(json.dumps(self.config, indent=2) + "\n"))

    def _state_path(self, name: str) -> Path:
        return self.out / "weights" / f"{name}.state.safetensors"

    def _write_models(self) -> None:
        """models.csv from the rows written so far, in model order. Never read back while training, so an
        analysis command run on the run meanwhile (which rewrites models.csv with its columns) loses no row."""
        write_csv(self.out / "models.csv", [MODEL_COLUMNS, *(self.rows[m] for m in sorted(self.rows))])

    def new_name(self) -> str:
        """The first free name: pop000, pop001, ...; a population retrained after its files were lost takes its
        name again."""
        name = next(f"pop{k:03d}" for k in itertools.count() if f"pop{k:03d}" not in self.names)
        self.names.add(name)
        return name

    def add_population(self, rows: list[ModelRow], history: dict[str, np.ndarray], weights: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor] | None = None, name: str | None = None) -> str:
        """Write a population's history, weights and (unfinished) state, then its models.csv rows, then its entry
        in config.json, each file whole (`write_atomic`): a run killed in between is repaired by `reopen`, which
        trusts config.json's entries alone, and continues from a state file, which holds everything of one step.
        Writing under a `name` already written replaces that population's files, rows and entry."""
        name = name or self.new_name()
        write_population(self.out, name, history, weights, state)
        self.record(name, [row.cells() for row in rows], rows[0].steps if rows else 0, state is not None)
        return name

    def record(self, name: str, cells: list[list], steps: int, state: bool) -> None:
        """A population whose files are written (here, or by another process of the run): its rows into
        models.csv, then its entry into config.json; a finished one's state file goes."""
        self.names.add(name)
        self.rows |= {int(row[0]): row for row in cells}
        self._write_models()
        entry = written_entry(name, cells, steps, state)
        self.config["written"] = [w for w in self.config["written"] if w["name"] != name] + [entry]
        self.write_config()
        if not state:
            self._state_path(name).unlink(missing_ok=True)

    def finish(self, status: str, **extra) -> None:
        """Mark the run finished (or interrupted), models.csv written once more whole."""
        self._write_models()
        self.config.update(status=status, finished=datetime.datetime.now().isoformat(timespec="seconds"), **extra)
        self.write_config()
        if status == "complete":  # every process's populations recorded
            self._drop_journals()
        self.close()

    def _drop_journals(self) -> None:
        for path in self.out.glob(JOURNALS):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Let another process write the run (the lock goes with the process too, however it ends)."""
        self.lock.close()


# ---- reading a run back ---------------------------------------------------------------------------------


class RunError(ConfigError):
    """A run directory whose files cannot be used as they are: the message names the file and the fix."""


def read_config(run: Path) -> dict:
    """config.json, checked: the grid, the settings and the list of populations written must be readable."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run} is not a fastgrok run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
        grid = config["grid"]
        if isinstance(grid, dict):
            grid.setdefault("op", [None])  # a run written before tasks were a grid axis
        if set(grid) != set(AXES) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ValueError("no valid grid")
        settings_of(config).check(training=False)
        n = len(Grid(grid))
        for w in config["written"]:
            if not (isinstance(w["name"], str) and w["name"].startswith("pop") and isinstance(w["steps"], int)
                    and all(isinstance(m, int) and 0 <= m < n for m in w["models"])):
                raise ValueError(f"a bad entry of 'written': {w}")
        if config["status"] not in ("running", "complete", "interrupted"):
            raise ValueError(f"unknown status {config['status']!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        why = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise RunError(f"{path} is damaged ({why}): restore it from a copy; the run cannot be read without "
                       "it") from None
    return config


def status(run: Path, config: dict) -> str:
    """The run's status in words; for a run config.json calls running, whether a process is still writing it
    (it holds the run's lock) or it stopped without finishing (killed, or its machine went down)."""
    if config["status"] != "running":
        return config["status"]
    try:
        _lock(Path(run)).close()
    except ConfigError:
        return "still training"
    except OSError:  # a run one may not write: whether it is live cannot be told
        return "running"
    return "unfinished (its process was killed or crashed)"


@dataclass
class Inspection:
    """What a run directory holds, file by file (inspect_run)."""

    config: dict
    rows: dict[int, ModelRow]  # the models.csv rows of the populations below
    finished: list[dict]  # config.json "written" entries of populations that trained every step, files intact
    partial: list[dict]  # those saved part-trained with their state (to continue from it), files intact
    problems: dict[str, str]  # population name -> why its files cannot be used
    orphans: list[Path]  # files no entry accounts for: a write a kill cut short, a state left after finishing

    @property
    def populations(self) -> list[dict]:
        return self.finished + self.partial

    def report(self, run: Path) -> list[str]:
        """What the run holds in a line, then a line for each population that cannot be used and each leftover
        file, with the fix (what `fastgrok check` prints)."""
        total, steps = len(Grid(self.config["grid"])), self.config["settings"]["steps"]
        trained = sum(len(w["models"]) for w in self.finished)
        partial = sum(len(w["models"]) for w in self.partial)
        lines = [f"{run}: {status(run, self.config)}; {trained} of {total} models trained, {partial} saved "
                 f"part-trained, {total - trained - partial} to train ({steps} steps each)"
                 + ("; every file intact" if not self.problems else "")]
        lines += [f"damaged: {why} (population {name}); `fastgrok train --resume {run}` trains it again, or restore "
                  "the file" for name, why in self.problems.items()]
        lines += [f"leftover: {path} (a write cut short, or a state its population no longer needs); "
                  f"`fastgrok train --resume {run}` removes it" for path in self.orphans]
        return lines


def inspect_run(run: Path) -> Inspection:
    """Check every file of a run without loading its weights: config.json, models.csv, and each written
    population's weights, history and (unfinished) state. Populations whose files are missing, damaged or without
    their rows in models.csv are `problems` (resume retrains them); config.json is the index of what was saved,
    so files it does not list are orphans."""
    run = Path(run)
    config = read_config(run)
    steps, grid = config["settings"]["steps"], Grid(config["grid"])
    cells, csv_problem, unreadable = _models_csv(run)
    _adopt_journals(run, config, cells)
    if unreadable and config["written"]:  # the index of every saved model: nothing can be trusted, or retrained over
        raise RunError(f"{unreadable}: restore it from a copy (a resume would train every population again)")
    finished, partial, problems, listed = [], [], {}, set()
    rows: dict[int, ModelRow] = {}
    for w in config["written"]:
        name = w["name"]
        files = [run / "weights" / f"{name}.safetensors", run / "history" / f"{name}.parquet"]
        if w["steps"] < steps:
            if not w.get("state"):  # interrupted at a second Ctrl-C before any save: trains again
                continue
            files.append(run / "weights" / f"{name}.state.safetensors")
        listed.update(files)
        why = next((why for f in files if (why := _file_problem(f, w["models"])) is not None), None)
        if why is None and (missing := [m for m in w["models"] if m not in cells]):
            why = (csv_problem or f"{run / 'models.csv'} has no row for model {missing[0]}")
        if why is not None:
            problems[name] = why
            continue
        try:
            read = {m: ModelRow.from_cells(cells[m], grid.model(m)) for m in w["models"]}
            other = next((m for m in w["models"] if not all(
                (cells[m][a] or None) == read[m][a] if a == "op" else
                math.isclose(float(cells[m][a]), read[m][a], rel_tol=1e-5) for a in AXES)), None)
        except (ValueError, TypeError) as e:
            problems[name] = f"{run / 'models.csv'} is damaged (a row of {name}: {e})"
            continue
        if other is not None:
            problems[name] = f"{run / 'models.csv'}: model {other} is not the grid's model {other} in config.json"
            continue
        rows |= read
        (finished if w["steps"] == steps else partial).append(w)
    found = {*run.glob(".*.tmp"), *run.glob("*/.*.tmp"), *run.glob("weights/*.safetensors"),
             *run.glob("history/*.parquet")}
    return Inspection(config, rows, finished, partial, problems, sorted(found - listed))


def _adopt_journals(run: Path, config: dict, cells: dict[int, dict[str, str]]) -> None:
    """Enter in `config` and `cells` (config.json and models.csv as read) the populations that processes other than
    0 saved and journalled but process 0 did not record (it stopped first): a later save of a population listed
    with the same models, or one not listed. Their files are then checked like any other's."""
    entries = {w["name"]: w for w in config["written"]}
    for path in sorted(run.glob(JOURNALS)):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                m = json.loads(line)
            except ValueError:  # a line a kill cut short
                continue
            old = entries.get(m["name"])
            if old is not None and (old["steps"] >= m["steps"] or old["models"] != [int(c[0]) for c in m["cells"]]):
                continue
            entries[m["name"]] = written_entry(m["name"], m["cells"], m["steps"], m["state"])
            cells |= {int(c[0]): dict(zip(MODEL_COLUMNS, ("" if v is None else str(v) for v in c))) for c in m["cells"]}
    config["written"] = list(entries.values())


def _file_problem(path: Path, models: list[int]) -> str | None:
    """Why a population file cannot be used, or None: read as far as its header (weights: also its model ids)."""
    if not path.is_file():
        return f"{path} is missing"
    try:
        if path.suffix == ".parquet":
            pq.read_metadata(path)
        else:
            with safe_open(str(path), framework="pt") as saved:
                if saved.get_tensor("model").tolist() != models:
                    return f"{path} holds other models than config.json lists"
    except (OSError, ValueError, SafetensorError) as e:  # pyarrow's ArrowInvalid is a ValueError
        return f"{path} is damaged ({str(e).splitlines()[0]})"
    return None


def _models_csv(run: Path) -> tuple[dict[int, dict[str, str]], str | None, str | None]:
    """models.csv's lines by model id, as text; why some line could not be read; and why the file could not be
    read at all (missing, no header). None where there is nothing to say."""
    path = run / "models.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in MODEL_COLUMNS if c not in (reader.fieldnames or ()) and c != "op"]
            if missing:
                why = f"{path} is damaged (no {missing[0]} column)"
                return {}, why, why
            cells, bad = {}, None
            for line, row in enumerate(reader, start=2):
                if None in row.values() or None in row or not row["model"].isdigit():
                    bad = bad or f"{path} is damaged (line {line})"
                    continue
                cells[int(row["model"])] = {"op": "", **row}  # a run from before tasks were an axis: no op
            return cells, bad, None
    except FileNotFoundError:
        return {}, f"{path} is missing", f"{path} is missing"
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        why = f"{path} is damaged ({str(e).splitlines()[0]})"
        return {}, why, why


def trained(run: Path) -> Inspection:
    """inspect_run, for commands that read what training saved: every population listed must be whole (else a
    RunError naming the file and the fix), and there must be one."""
    found = inspect_run(run)
    if found.problems:
        name, why = next(iter(found.problems.items()))
        raise RunError(f"{why}: population {name}; `fastgrok train --resume {run}` retrains it, or restore the file")
    if not found.rows:
        raise RunError(f"{run} holds no trained model yet (the run is {status(run, found.config)}): "
                       f"`fastgrok train --resume {run}` trains it")
    return found


def read_models(run: Path) -> list[ModelRow]:
    """The models.csv rows of every population saved whole, in model order, each model's grid values exactly
    as config.json's grid has them (models.csv holds 12 digits; a diagram's cells and a rebuilt training split
    need the grid's own values). A run with nothing saved yet, or a damaged file, is a RunError."""
    return sorted(trained(run).rows.values(), key=lambda r: r.model)


def read_history(run: Path) -> pa.Table:
    """Every metric of every saved model at every logged step, from the history files config.json lists."""
    found = trained(run)
    return pa.concat_tables([pq.read_table(Path(run) / "history" / f"{w['name']}.parquet")
                             for w in sorted(found.populations, key=lambda w: w["name"])])


# Analysis reads a run's weights a piece at a time, whole models of at most this many bytes: its memory does not
# grow with the run (8,192 models of N 512 hold 4.9 GB of U, V, W; one piece of them 0.26 GB).
READ_BYTES = 256 << 20


def read_weights(run: Path, models: set[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The run's weights when asked for: dicts of the family's tensors and `model`, each of one population's
    models, at most READ_BYTES of them. With `models`, only their rows are read, a run of consecutive rows at a
    time, and a population file holding none of them no further than its model ids (a model per phase of a
    1,156-model run at N 500: 3 MB, not 670). Only the populations config.json lists, checked (trained)."""
    for w in sorted(trained(run).populations, key=lambda w: w["name"]):
        with safe_open(str(Path(run) / "weights" / f"{w['name']}.safetensors"), framework="pt") as saved:
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
    """An unfinished population's state (Population.state()) and history, to continue it."""
    state = load_file(str(Path(run) / "weights" / f"{name}.state.safetensors"))
    return state, pq.read_table(Path(run) / "history" / f"{name}.parquet")


def settings_of(config: dict) -> Settings:
    s = dict(config["settings"])
    s["betas"] = tuple(s["betas"])
    return Settings(**s)


def recipe(config: dict) -> str:
    """A run's training recipe in a line: the grid axes all its models share, steps and batches, and the settings
    that differ from the paper's defaults."""
    settings, grid = settings_of(config), config["grid"]
    parts = [f"p {settings.p}", *(f"{a} {axis_text(v[0])}" for a, v in grid.items()
                                  if len(v) == 1 and a != "seed" and v[0] is not None),
             f"{settings.steps} steps", settings.batching]
    family = FAMILIES[settings.model]
    default = Settings(**family.defaults)  # the paper's settings, as the command line gives them to this family
    parts += [f"{k} {getattr(settings, k)}" for k in ("op", "terms", "act", "loss", "optimizer", "noise")
              if getattr(settings, k) != getattr(default, k) and not (k == "op" and grid["op"] != [None])]
    if settings.model != Settings.model:  # the family first, with its own options where not their defaults
        parts[:0] = [settings.model, *(f"{k} {getattr(settings, k)}" for k in family.options
                                       if getattr(settings, k) != getattr(default, k))]
    return ", ".join(parts)


HISTORY_COLUMNS = ("model", "step", *METRICS, "ipr")  # ipr: mean neuron IPR of the model


def load_populations(run: Path, device: str | torch.device = "cpu", models: set[int] | None = None):
    """The run's trained models as Populations (restricted to `models`; a saved population in pieces of
    read_weights' size), weights loaded, data splits rebuilt from the seeds. Yields them one at a time to bound
    memory."""
    from fastgrok.population import Population

    found = trained(run)
    settings, rows = settings_of(found.config), found.rows
    wanted = set(rows) if models is None else set(models) & set(rows)
    for weights in read_weights(run, wanted):
        ids = weights["model"].tolist()
        pop = Population([rows[m].hyper for m in ids], settings, device, model_ids=ids)
        pop.load_weights(weights)
        yield pop
