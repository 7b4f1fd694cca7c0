"""A population: B models of one width as stacked tensors, with their data, optimizer state and metrics.

Layout (the kernels' too): U, V: (B, p, N) so that U e_m is the row U[b, m]; W: (B, N, p). Model b equals the
reference MLP with U = U[b].T, V = V[b].T, W = W[b].T. Each model has its own training set (alpha, split seed),
corruption (xi, noise seed), init seed, lr, weight decay and dropout; training sets are padded to the largest D
and padded slots carry zero weight. With Settings.batch_size a step sees a minibatch of each model's training
set (Population.batch); with Settings.batchnorm every model has BatchNorm1d's weight, bias and running
statistics, (B, N) each.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from fastgrok import reference
from fastgrok.config import Hyper, Settings
from fastgrok.data import (checked_train_size, epoch_order, generator, make_split, pair_count, task_table,
                           train_size)
from fastgrok.errors import ConfigError
from fastgrok.kernels import layout  # imports no triton

BN_PARAMS = ("bn_weight", "bn_bias")         # trained, like U, V, W
BN_BUFFERS = ("running_mean", "running_var")  # BatchNorm1d's running statistics
BN_EPS, BN_MOMENTUM = 1e-5, 0.1               # BatchNorm1d's defaults
# each metric of Population.evaluate: (the per-example value it averages, the examples it averages over)
_METRIC_PARTS = {"train_loss": ("loss", "train"), "test_loss": ("loss", "test"), "train_acc": ("hit", "train"),
                 "test_acc": ("hit", "test"), "clean_acc": ("hit", "clean"), "corrupted_acc": ("hit", "corrupted"),
                 "inverted_acc": ("hit_true", "corrupted")}
METRICS = tuple(_METRIC_PARTS)


def flat_rows(idx: torch.Tensor, p: int) -> torch.Tensor:
    """(B, D) residues -> (B D,) row indices into a (B p, N) view of U or V."""
    return (torch.arange(idx.shape[0], device=idx.device)[:, None] * p + idx).reshape(-1)


def pre_activation(U, V, m, n) -> torch.Tensor:
    """U[b, m[b, d]] + V[b, n[b, d]], (B, D, N): the one-hot first layer is a gather. index_select on the
    flattened rows, where advanced indexing U[rows, m] took 8 times longer on a CPU (2 cores, B 20, D 1104,
    N 128: 2.7 against 0.32 ms); the same numbers."""
    B, p, N = U.shape
    pre = U.reshape(B * p, N).index_select(0, flat_rows(m, p))
    pre += V.reshape(B * p, N).index_select(0, flat_rows(n, p))
    return pre.view(B, m.shape[1], N)


def forward(U, V, W, m, n, act: str, mask=None, bn=None) -> torch.Tensor:
    """Batched reference forward: m, n (B, D) -> (B, D, p). bn: BatchNorm at evaluation as an affine map of the
    activation, (scale, shift), (B, N) each (Population.bn_affine)."""
    pre = pre_activation(U, V, m, n)
    if mask is not None:
        pre = pre * mask
    h = reference.ACTIVATIONS[act](pre)
    if bn is not None:
        h = torch.addcmul(bn[1][:, None], h, bn[0][:, None])
    return torch.bmm(h, W)


class Population:
    def __init__(self, hypers: list[Hyper], settings: Settings, device: str | torch.device = "cpu",
                 model_ids: list[int] | None = None):
        widths = {h.width for h in hypers}
        if len(widths) != 1:
            raise ValueError(f"a population has one width, got {sorted(widths)}")
        settings.check(training=False)
        self.hypers, self.settings, self.device = list(hypers), settings, torch.device(device)
        self.model_ids = list(model_ids) if model_ids is not None else list(range(len(hypers)))
        self.width, p = widths.pop(), settings.p
        if self.device.type == "cpu":
            set_cpu_malloc()
        B = len(hypers)

        check_training_sets(hypers, settings)
        m_all, n_all, z_all = task_table(settings.op, p)
        # Each model's split and initial weights come from its own generators, so they are drawn on all the
        # host's cores at once (torch releases the GIL): the same numbers, several times faster for big grids.
        pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1))
        splits = list(pool.map(lambda h: make_split(z_all, p, h.alpha, h.xi, h.split_seed(settings),
                                                    h.split_seed(settings), settings.noise), hypers))
        self.D = torch.tensor([s.size for s in splits])
        self.n_corrupt = torch.tensor([s.n_corrupt for s in splits])
        d_max = int(self.D.max())
        perm = torch.stack([s.perm for s in splits])  # (B, P): training pairs first
        labels = torch.zeros(B, d_max, dtype=torch.long)
        for b, s in enumerate(splits):
            labels[b, : s.size] = s.labels
        slot = torch.arange(d_max)
        dev = self.device
        self.valid = (slot < self.D[:, None]).to(dev)  # (B, Dmax): real training example
        self.pairs = (m_all.to(dev), n_all.to(dev), z_all.to(dev))
        self.perm = perm.to(dev)
        train_idx = perm[:, :d_max]
        self.train_m, self.train_n = m_all[train_idx].to(dev), n_all[train_idx].to(dev)
        self.train_y = labels.to(dev)  # labels as trained on (corrupted ones included)

        U, V, W = torch.empty(B, p, self.width), torch.empty(B, p, self.width), torch.empty(B, self.width, p)

        def init(b: int) -> None:
            u, v, w = reference.init_weights(p, self.width, generator(hypers[b].seed, "init"))
            U[b], V[b], W[b] = u.T, v.T, w.T

        list(pool.map(init, range(B)))
        pool.shutdown()
        self.U, self.V, self.W = U.to(dev), V.to(dev), W.to(dev)
        self.batchnorm, self.batch_size = settings.batchnorm, settings.batch_size
        if self.batchnorm:
            self.bn_weight, self.running_var = (torch.ones(B, self.width, device=dev) for _ in range(2))
            self.bn_bias, self.running_mean = (torch.zeros(B, self.width, device=dev) for _ in range(2))
        if self.batch_size is not None:
            self._epoch = torch.full((B,), -1)  # the epoch each model's minibatch order `_order` belongs to
            self._order = torch.zeros(B, d_max, dtype=torch.long, device=dev)
        self.exp_avg = [torch.zeros_like(t) for t in self.optimized]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.optimized]

        vec = lambda name: torch.tensor([float(getattr(h, name)) for h in hypers], device=dev)  # noqa: E731
        self.lr, self.wd, self.dropout = vec("lr"), vec("wd"), vec("dropout")
        self.beta1 = torch.full((B,), settings.betas[0], device=dev)
        self.beta2 = torch.full((B,), settings.betas[1], device=dev)
        self.eps = torch.full((B,), settings.eps, device=dev)
        self.diverged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.step = 0
        # One dropout stream per model, so a model draws the same masks alone or in any population.
        self.dropout_seed = torch.tensor([generator(h.seed, "dropout").initial_seed() & 0xFFFFFFFF for h in hypers])
        self._dropout_gens = [
            torch.Generator(device=dev).manual_seed(generator(h.seed, "dropout").initial_seed()) if h.dropout > 0 else None
            for h in hypers
        ]

    def __len__(self) -> int:
        return len(self.hypers)

    @property
    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.U, self.V, self.W

    @property
    def optimized_names(self) -> tuple[str, ...]:
        return ("U", "V", "W", *(BN_PARAMS if self.batchnorm else ()))

    @property
    def optimized(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the optimizer updates: U, V, W and, with BatchNorm, its weight and bias."""
        return tuple(getattr(self, name) for name in self.optimized_names)

    @property
    def batch_counts(self) -> torch.Tensor:
        """(B,) examples each model sees in a step: its training set, or the batch size."""
        return self.D if self.batch_size is None else torch.full_like(self.D, self.batch_size)

    def batch(self) -> tuple[torch.Tensor, ...]:
        """The examples of the coming step: m, n, labels, valid (B, d) and the counts (B,) as float.

        Full batch: the padded training sets. Minibatches: batch_size slots of each model's training set,
        fastgrok.data.batch_slots(seed, D, batch_size, step); each model's epoch order is drawn once per epoch."""
        if self.batch_size is None:
            return self.train_m, self.train_n, self.train_y, self.valid, self.D.to(self.device).float()
        bs, B = self.batch_size, len(self)
        per_epoch = self.D // bs
        epoch = self.step // per_epoch
        for b in torch.nonzero(epoch != self._epoch).flatten().tolist():
            d = int(self.D[b])
            self._order[b, :d] = epoch_order(self.hypers[b].seed, int(epoch[b]), d).to(self.device)
            self._epoch[b] = epoch[b]
        first = ((self.step % per_epoch) * bs).to(self.device)[:, None]
        slots = torch.gather(self._order, 1, first + torch.arange(bs, device=self.device))
        m, n, y = (torch.gather(t, 1, slots) for t in (self.train_m, self.train_n, self.train_y))
        valid = torch.ones(B, bs, dtype=torch.bool, device=self.device)
        return m, n, y, valid, torch.full((B,), float(bs), device=self.device)

    def dropout_masks(self, models: slice = slice(None), d_max: int | None = None) -> torch.Tensor | None:
        """Draw this step's masks (len(models), d_max, N) for a slice of the models (each has its own stream, so
        slices drawn in any order give the same masks): model b's is reference.dropout_mask((d_b, N)), d_b the
        examples it sees this step (batch_counts)."""
        ids = range(len(self))[models]
        if all(self._dropout_gens[b] is None for b in ids):
            return None
        counts = self.batch_counts
        masks = torch.ones(len(ids), d_max or int(counts.max()), self.width, device=self.device)
        for i, b in enumerate(ids):
            if (g := self._dropout_gens[b]) is not None:
                d = int(counts[b])
                masks[i, :d] = reference.dropout_mask((d, self.width), self.hypers[b].dropout, g, self.device)
        return masks

    def bn_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """BatchNorm at evaluation, BN(h) = h scale + shift with the running statistics; None without BatchNorm."""
        if not self.batchnorm:
            return None
        scale = self.bn_weight * torch.rsqrt(self.running_var + BN_EPS)
        return scale, self.bn_bias - self.running_mean * scale

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """BatchNorm1d's update with this step's batch mean and unbiased variance (B, N); frozen models keep theirs."""
        keep = self.diverged[:, None]
        for buffer, new in ((self.running_mean, mean), (self.running_var, var)):
            buffer.copy_(torch.where(keep, buffer, torch.lerp(buffer, new, BN_MOMENTUM)))

    def weights(self) -> dict[str, torch.Tensor]:
        """What the weights file of a population holds: U, V, W, BatchNorm's tensors, the model ids."""
        names = ("U", "V", "W", *((*BN_PARAMS, *BN_BUFFERS) if self.batchnorm else ()))
        return {**{k: getattr(self, k) for k in names}, "model": torch.tensor(self.model_ids)}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy saved weights (results.read_weights, one row per model of this population) into it."""
        for name in self.weights():
            if name != "model":
                getattr(self, name).copy_(weights[name])

    def state(self) -> dict[str, torch.Tensor]:
        """What continuing training needs, all of one step: weights(), Adam moments, step, diverged flags,
        dropout streams."""
        moments = {f"{kind}.{name}": t for kind, ts in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))
                   for name, t in zip(self.optimized_names, ts)}
        out = {**self.weights(), **moments, "step": torch.tensor([self.step]), "diverged": self.diverged}
        streams = [g.get_state() for g in self._dropout_gens if g is not None]
        if streams:
            out["dropout_streams"] = torch.stack(streams)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from state() saved by a population of the same models."""
        if state["model"].tolist() != self.model_ids:
            raise ValueError("saved weights belong to other models")
        self.load_weights(state)
        for i, name in enumerate(self.optimized_names):
            self.exp_avg[i].copy_(state[f"exp_avg.{name}"])
            self.exp_avg_sq[i].copy_(state[f"exp_avg_sq.{name}"])
        self.step = int(state["step"])
        self.diverged.copy_(state["diverged"])
        streams = iter(state.get("dropout_streams", []))
        for g in self._dropout_gens:
            if g is not None:
                g.set_state(next(streams).clone())  # a row view crashes set_state (torch 2.13)

    def model(self, b: int) -> reference.MLP:
        """Model b as a reference nn.Module (a copy of its current weights)."""
        mlp = reference.MLP(self.settings.p, self.width, self.settings.act, self.hypers[b].dropout,
                            batchnorm=self.batchnorm)
        with torch.no_grad():
            mlp.U.copy_(self.U[b].T)
            mlp.V.copy_(self.V[b].T)
            mlp.W.copy_(self.W[b].T)
            if self.batchnorm:
                for ours, theirs in zip((*BN_PARAMS, *BN_BUFFERS), ("weight", "bias", *BN_BUFFERS)):
                    getattr(mlp.bn, theirs).copy_(getattr(self, ours)[b])
        return mlp

    @torch.no_grad()
    def evaluate(self, engine=None, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
        """Every metric of every model on all pairs (no dropout): a dict of (B,) float64 CPU tensors.

        train_*: training set against the labels trained on; test_*: held-out pairs (true labels);
        clean_acc: uncorrupted training examples; corrupted_acc: corrupted examples against their corrupted
        labels (memorised); inverted_acc: corrupted examples against their true labels. NaN where the subset
        is empty (corrupted_acc of a model with xi = 0).

        `engine` (a backend; default torch) runs the forward pass for chunks of models whose working memory,
        engine.eval_bytes(width, p) per example, fits `max_bytes` (default: eval_limit(device)); a model whose
        own evaluation does not fit goes through its pairs in spans that do. BatchNorm models evaluate with
        their running statistics, in torch (the kernels have no BatchNorm).
        """
        max_bytes = eval_limit(self.device) if max_bytes is None else max_bytes
        bn = self.bn_affine()
        if bn is not None:
            engine = None
        outputs = engine.outputs if engine is not None else torch_outputs
        per_example = (engine.eval_bytes if engine is not None else torch_eval_bytes)(self.width, self.settings.p)
        m_all, n_all, z_all = self.pairs
        P, B, d_max = z_all.numel(), len(self), self.train_y.shape[1]
        chunk = max(1, min(B, max_bytes // (P * per_example)))
        span = P if chunk > 1 else max(1, min(P, max_bytes // per_example))
        out = {k: [] for k in METRICS}
        for lo in range(0, B, chunk):
            sl = slice(lo, min(B, lo + chunk))
            D, c = self.D[sl].to(self.device)[:, None], self.n_corrupt[sl].to(self.device)[:, None]
            sums, counts = {}, {}  # per model: each metric's sum and each subset's size, added up span by span
            for start in range(0, P, span):
                stop = min(P, start + span)
                perm = self.perm[sl, start:stop]  # the model's slots in its order: training slots first
                true = z_all[perm]
                labels = true.clone()  # as trained on: corrupted labels on the training slots
                t = max(0, min(stop, d_max) - start)
                labels[:, :t] = torch.where(self.valid[sl, start : start + t], self.train_y[sl, start : start + t],
                                            true[:, :t])
                args = (self.U[sl], self.V[sl], self.W[sl], m_all[perm], n_all[perm], labels, self.settings.act,
                        self.settings.loss)
                pred, loss = outputs(*args) if bn is None else outputs(*args, bn=(bn[0][sl], bn[1][sl]))
                slot = torch.arange(start, stop, device=self.device)
                train, corrupted = slot < D, slot < c
                where = {"train": train, "test": ~train, "clean": train & ~corrupted, "corrupted": corrupted}
                values = {"loss": loss.double(), "hit": pred == labels, "hit_true": pred == true}
                for k, (value, subset) in _METRIC_PARTS.items():
                    v, w = values[value], where[subset]
                    sums[k] = sums.get(k, 0) + (torch.where(w, v, 0.0) if v.is_floating_point() else v & w).sum(1)
                for subset, w in where.items():
                    counts[subset] = counts.get(subset, 0) + w.sum(1)
            for k, (_, subset) in _METRIC_PARTS.items():
                out[k].append(sums[k].double() / counts[subset])  # NaN (0/0) where the subset is empty
        return {k: torch.cat(v).cpu() for k, v in out.items()}


# A CPU evaluates chunks of models whose working memory fits its last-level cache (as CPU_CHUNK_BYTES
# for training): on the 2-core development machine (32 MB L3) 16 MiB evaluated the cpu-demo population in 50 ms
# and 16 models of p 97, N 500 in 270 ms, against 132 and 612 ms with the 256 MiB used before (4 MiB: 64, 285).
CPU_EVAL_BYTES = 16 << 20


def eval_limit(device: torch.device | str) -> int:
    """Bytes Population.evaluate works in at once: 2 GiB on a GPU, CPU_EVAL_BYTES on a CPU."""
    return CPU_EVAL_BYTES if torch.device(device).type == "cpu" else 1 << 31


# On a CPU the step is bound by memory traffic, not arithmetic: the torch backend works through a population in
# pieces whose (examples, N) activations take at most this many bytes, so that the few such tensors a pass holds
# stay in the last-level cache: chunks of models, and a model whose own activations are larger in spans of its
# examples (their losses and gradients summed). bench/torch_knobs.py times sizes side by side; on the 2-core
# development machine (AMD EPYC, 32 MB L3; bench/results/cpu-2core-chunks.json and a repeat) 4 MiB against the
# 24 MiB used before: the cpu-demo population 1.95-1.98x (1,012 against 519 model-steps/s), 16 models of p 97,
# N 128 2.1-2.2x, 16 of N 500 1.2-1.6x, one model of N 500 (in spans) 1.03-1.06x (1.4x in a third run); no other
# size was faster beyond the noise (about 10%), and spans also bound the memory of one wide model. Timed again
# with CPU_MALLOC below (bench/results/cpu-2core-chunks-malloc.json), 4 and 8 MiB are still the fastest or level.
CPU_CHUNK_BYTES = 4 << 20


# glibc's malloc, left to itself, hands freed memory at the top of its heap back to the kernel as soon as twice its
# (adaptive) mmap threshold is free there, and maps buffers above that threshold afresh each time: every step's
# buffers were then faulted in again page by page (the cpu-demo: 2.4M minor page faults in 300 steps, a third of
# its step time in the kernel). These mallopt settings serve buffers up to 32 MiB (glibc's largest threshold) from
# the heap and keep up to 256 MiB of it mapped. bench/torch_knobs.py --knob malloc against glibc's own, two runs on
# the 2-core development machine (bench/results/cpu-2core-malloc*.json): the cpu-demo population 1.44-1.89x, 16
# models of p 97 at N 128 1.30-1.65x and at N 500 1.33-1.41x, one model of N 500, 9 of alpha 0.1-0.9 and 128 models
# (whose optimizer buffers are over 32 MiB, mapped either way) 0.95-1.16x, within the noise; the largest resident
# memory of short runs within 8%. M_TOP_PAD instead (64 MiB) was as fast on the cpu-demo, but it fixes the mmap
# threshold at 128 KiB: 16 models of N 500 ran 2.4x slower.
CPU_MALLOC = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 256 << 20}
_MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # malloc.h
_malloc_set = False


def set_cpu_malloc() -> None:
    """Apply CPU_MALLOC once per process (a CPU population does): under glibc only, and never over a user's own
    MALLOC_* variables or GLIBC_TUNABLES."""
    global _malloc_set
    if _malloc_set:
        return
    _malloc_set = True
    mallopt = glibc_mallopt()
    if mallopt is None or any(map(malloc_variable, os.environ)):
        return
    for name, value in CPU_MALLOC.items():
        mallopt(_MALLOPT_PARAMS[name], value)


def malloc_variable(name: str) -> bool:
    """Whether an environment variable sets glibc's malloc (then the user's settings rule, not CPU_MALLOC)."""
    return name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"


def glibc_mallopt():
    """glibc's mallopt, or None (not Linux, or another C library)."""
    try:
        if (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        pass
    return None


def cpu_pieces(d: int, width: int, p: int, batchnorm: bool = False) -> tuple[int, int]:
    """The pieces a CPU step of the torch backend goes through: chunks of this many models, each in spans of
    this many examples (d: the step's examples of the population's largest model)."""
    row = 4 * max(width, p)  # bytes of one example's activations
    chunk = max(1, CPU_CHUNK_BYTES // (row * d))
    span = d if batchnorm else max(16, CPU_CHUNK_BYTES // row)  # BatchNorm's statistics need all examples at once
    return chunk, span


def torch_eval_bytes(width: int, p: int) -> int:
    """Working memory per example of torch_outputs: pre-activation, activation, logits and their loss terms,
    plus the int64 indices and labels the evaluation builds."""
    return 4 * (2 * width + 3 * p) + 6 * 8


def torch_outputs(U, V, W, m, n, y, act: str, loss: str, bn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and per-example losses of a chunk of models on examples (m, n) with labels y: (bc, E)."""
    logits = forward(U, V, W, m, n, act, bn=bn)
    return logits.argmax(-1), reference.per_example_loss(logits, y, loss)


def check_training_sets(hypers: list[Hyper], settings: Settings) -> None:
    """Every model's alpha leaves at least one training and one test pair, and its training set holds at least
    one batch: checked before a run writes anything."""
    num_pairs = pair_count(settings.op, settings.p)
    for alpha in sorted({h.alpha for h in hypers}):
        d = checked_train_size(num_pairs, alpha)
        if settings.batch_size is not None and d < settings.batch_size:
            raise ConfigError(f"--batch-size {settings.batch_size} is larger than the training set of alpha "
                              f"{alpha:g} ({d} examples)")


def bytes_per_model(p: int, width: int, d_max: int, num_pairs: int, backend: str = "torch",
                    batch_size: int | None = None, batchnorm: bool = False, dropout: bool = False) -> int:
    """Device memory of one model in a population (fp32 parameters).

    Always: parameters, gradients and two Adam moments (4 x 3 p N); the data (int64 pair order, training
    indices and labels, the valid mask). torch: its step's working memory (torch_step_bytes). triton: the
    kernels' buffers as they lay them out (kernels/layout.py step_bytes; bf16 for a backend named
    "triton-bf16..."). d: the examples of a step (the training set or the batch size). Minibatches: the epoch
    order (int64, D) and the batch's indices and labels (3 d int64). BatchNorm (torch): its weight, bias, their
    gradients and moments and the running statistics (10 N)."""
    params = 4 * 3 * p * width
    data = 8 * num_pairs + 8 * 3 * d_max + d_max + 256  # + per-model scalars (seeds, counts, hyper-parameters)
    d = d_max
    if batch_size is not None:
        d = min(d_max, batch_size)
        data += 8 * d_max + 8 * 3 * d
    if backend.startswith("triton"):
        work = layout.step_bytes(p, width, d, _triton_precision(backend), dropout)
    else:
        work = torch_step_bytes(d, width, p, batchnorm)
    if batchnorm:
        params += 10 * width
    return 4 * params + work + data


def torch_step_bytes(d: int, width: int, p: int, batchnorm: bool = False) -> int:
    """Working memory of the torch backend's step on d examples (of one model or of several): the written-out
    backward's pre-activation, activation, mask and dS with its temporary (5 d N), outputs, one-hot targets,
    difference, G and loss terms (5 d p); BatchNorm's normalised activation and its output (2 d N)."""
    return 4 * (5 * d * width + 5 * d * p + (2 * d * width if batchnorm else 0))


def pair_eval_bytes(width: int, p: int, backend: str = "torch") -> int:
    """Working memory per pair of Population.evaluate's forward pass (torch_outputs, or the Triton evaluation
    kernel's: kernels/layout.py eval_bytes)."""
    return layout.eval_bytes(width, p) if backend.startswith("triton") else torch_eval_bytes(width, p)


def _triton_precision(backend: str) -> str:
    """The dots' precision of a Triton backend named "triton[-PRECISION[-...]]" (TritonBackend.name)."""
    parts = backend.split("-")
    return parts[1] if len(parts) > 1 else "fp32"


def population_bytes(settings: Settings, width: int, d_max: int, num_pairs: int, models: int, backend: str = "torch",
                     dropout: bool = False, device: torch.device | str = "cuda") -> int:
    """Device memory of a population of `models` models of this width and largest training set, beside its
    evaluation (at most eval_limit: chunks of models, or spans of one model's pairs). On a CPU the torch
    backend's step holds one piece of the population at a time (cpu_pieces): that piece's activations, its
    gradients and their sum over spans, and its models' dropout masks (whole training sets), not every model's."""
    s = settings
    need = bytes_per_model(s.p, width, d_max, num_pairs, backend, s.batch_size, s.batchnorm, dropout)
    shared = 0
    if torch.device(device).type == "cpu" and not backend.startswith("triton"):
        d = min(d_max, s.batch_size or d_max)
        chunk, span = cpu_pieces(d, width, s.p, s.batchnorm)
        held = min(models, chunk)
        need -= torch_step_bytes(d, width, s.p, s.batchnorm)
        shared = (torch_step_bytes(held * min(d, span), width, s.p, s.batchnorm) + 2 * held * 4 * 3 * s.p * width
                  + (4 * held * d * width if dropout else 0))
    evaluation = min(eval_limit(device), models * num_pairs * pair_eval_bytes(width, s.p, backend))
    return models * need + shared + evaluation


def models_that_fit(settings: Settings, width: int, d_max: int, num_pairs: int, device: torch.device, budget: int,
                    backend: str = "torch", dropout: bool = False) -> int:
    """The most models of this width one population can hold in `budget` bytes (population_bytes, which grows
    with the models); ConfigError if not even one fits."""
    def size(models: int) -> int:
        return population_bytes(settings, width, d_max, num_pairs, models, backend, dropout, device)

    if size(1) > budget:
        raise ConfigError(
            f"one model of width {width} (p {settings.p}) needs about {size(1) / 2**30:,.1f} GiB, more "
            f"than the {budget / 2**30:.1f} GiB this {device.type} device can give a population"
        )
    fits, too_many = 1, 2
    while size(too_many) <= budget:
        fits, too_many = too_many, 2 * too_many
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if size(mid) <= budget else (fits, mid)
    return fits


# The share of a device's memory a population may take, and how `fastgrok train --dry-run` says it
BUDGETS = {"cuda": (0.8, "80% of its free memory"), "cpu": (0.5, "half the available host memory")}


def memory_budget(device: torch.device) -> int:
    """Bytes a population may use: BUDGETS's share of the free GPU memory or of the available host memory
    (8 GiB where /proc/meminfo cannot tell)."""
    share = BUDGETS[device.type][0]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(share * free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(share * int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return 8 << 30


def plan(hypers: list[Hyper], settings: Settings, device: torch.device, budget: int | None = None,
         backend: str = "torch") -> list[list[int]]:
    """Split a grid into populations: one width each, as many models as fit the memory budget."""
    check_training_sets(hypers, settings)
    budget = memory_budget(device) if budget is None else budget
    num_pairs = pair_count(settings.op, settings.p)
    by_width: dict[int, list[int]] = {}
    for i, h in enumerate(hypers):
        by_width.setdefault(h.width, []).append(i)
    populations = []
    for width, ids in by_width.items():
        # by training-set size, so that a population (and a CPU chunk of one) holds models of similar D; largest
        # first, because a GPU starts a launch's programs roughly in order and the backward's take time in
        # proportion to D: the longest then start first and the shortest fill the end, instead of a last wave of
        # the longest ones (the 1,156-model diagrams mix alpha 0.1 to 0.9 in one population)
        ids.sort(key=lambda i: train_size(num_pairs, hypers[i].alpha), reverse=True)
        d_max = train_size(num_pairs, hypers[ids[0]].alpha)
        per_pop = models_that_fit(settings, width, d_max, num_pairs, device, budget, backend,
                                  any(hypers[i].dropout > 0 for i in ids))
        populations += [ids[i : i + per_pop] for i in range(0, len(ids), per_pop)]
    return populations

