"""A population: B models of one family and width as stacked tensors, with their data, optimizer state and metrics.

The family (fastgrok.families, chosen by Settings.model) says which tensors a model has; the population stacks
each as (B, *shape) and reaches them as pop.tensors[name] or pop.<name> (pop.U for the MLP's U). Each model has its
own task (of one kind: planner.task_kind), training set (alpha, split seed), corruption (xi, noise seed), init seed,
lr, weight decay and dropout; training sets are padded to the largest D and padded slots carry zero weight. With
Settings.batch_size a step sees a minibatch of each model's training set (Population.batch).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from fastgrok import reference
from fastgrok.config import Hyper, Settings
from fastgrok.data import check_training_sets, epoch_order, generator, make_split, task_table
from fastgrok.families import family_of
from fastgrok.planner import eval_limit, task_kind

# each metric of Population.evaluate: (the per-example value it averages, the examples it averages over)
_METRIC_PARTS = {"train_loss": ("loss", "train"), "test_loss": ("loss", "test"), "train_acc": ("hit", "train"),
                 "test_acc": ("hit", "test"), "clean_acc": ("hit", "clean"), "corrupted_acc": ("hit", "corrupted"),
                 "inverted_acc": ("hit_true", "corrupted")}
METRICS = tuple(_METRIC_PARTS)


class Population:
    def __init__(self, hypers: list[Hyper], settings: Settings, device: str | torch.device = "cpu",
                 model_ids: list[int] | None = None):
        widths = {h.width for h in hypers}
        if len(widths) != 1:
            raise ValueError(f"a population has one width, got {sorted(widths)}")
        tasks = list(dict.fromkeys(h.op for h in hypers))  # the grid's ops, or None for the run's
        if len({task_kind(settings.with_op(op)) for op in tasks}) != 1:
            raise ValueError(f"a population's tasks are of one kind (planner.task_kind), got {tasks}")
        settings = settings.with_op(tasks[0])  # the first task's: the others differ only in their labels
        settings.check(training=False)
        self.hypers, self.settings, self.device = list(hypers), settings, torch.device(device)
        self.family = family_of(settings)
        self.family.check_widths(settings, widths)
        self.model_ids = list(model_ids) if model_ids is not None else list(range(len(hypers)))
        self.width, p = widths.pop(), settings.p
        B = len(hypers)

        check_training_sets({h.alpha for h in hypers}, settings)
        tables = [task_table(settings.with_op(op).op, p, settings.terms) for op in tasks]
        x_all, z_all = tables[0][0], torch.stack([z for _, z in tables])  # the tasks' inputs are the same; (T, P)
        rows = [tasks.index(h.op) for h in hypers]  # each model's row of z_all
        self.task = torch.tensor(rows)
        # Each model's split and initial weights come from its own generators, so they are drawn on all the
        # host's cores at once (torch releases the GIL): the same numbers, several times faster for big grids.
        pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1))
        splits = list(pool.map(lambda h, t: make_split(z_all[t], p, h.alpha, h.xi, h.split_seed(settings),
                                                       h.split_seed(settings), settings.noise), hypers, rows))
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
        self.table = (x_all.to(dev), z_all.to(dev))  # every input's operands (S, P) and each task's labels (T, P)
        self.task = self.task.to(dev)
        self.perm = perm.to(dev)
        self.train_x = x_all[:, perm[:, :d_max]].to(dev)  # (S, B, Dmax): the training examples' operands
        self.train_y = labels.to(dev)  # labels as trained on (corrupted ones included)

        specs = self.family.tensors(settings, self.width)
        stacked = {name: torch.empty(B, *spec.shape) if spec.fill is None else None for name, spec in specs.items()}

        def init(b: int) -> None:
            for name, value in self.family.init(settings, self.width, generator(hypers[b].seed, "init")).items():
                stacked[name][b] = value

        list(pool.map(init, range(B)))
        pool.shutdown()
        self.tensors = {name: t.to(dev) if t is not None else torch.full((B, *specs[name].shape), specs[name].fill,
                                                                          device=dev)
                        for name, t in stacked.items()}
        self.optimized_names = self.family.trained(settings)
        self.decays = tuple(specs[name].decay for name in self.optimized_names)  # weight decay, tensor by tensor
        self.batch_size = settings.batch_size
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

    def __getattr__(self, name: str) -> torch.Tensor:
        """The family's tensors by name: pop.U is pop.tensors["U"]."""
        tensors = self.__dict__.get("tensors")
        if tensors is not None and name in tensors:
            return tensors[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def optimized(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the optimizer updates, in the family's order."""
        return tuple(self.tensors[name] for name in self.optimized_names)

    @property
    def batch_counts(self) -> torch.Tensor:
        """(B,) examples each model sees in a step: its training set, or the batch size."""
        return self.D if self.batch_size is None else torch.full_like(self.D, self.batch_size)

    def batch(self) -> tuple[torch.Tensor, ...]:
        """The examples of the coming step: operands x (S, B, d), labels and valid (B, d), the counts (B,) as
        float.

        Full batch: the padded training sets. Minibatches: batch_size slots of each model's training set,
        fastgrok.data.batch_slots(seed, D, batch_size, step); each model's epoch order is drawn once per epoch."""
        if self.batch_size is None:
            return self.train_x, self.train_y, self.valid, self.D.to(self.device).float()
        bs, B = self.batch_size, len(self)
        per_epoch = self.D // bs
        epoch = self.step // per_epoch
        for b in torch.nonzero(epoch != self._epoch).flatten().tolist():
            d = int(self.D[b])
            self._order[b, :d] = epoch_order(self.hypers[b].seed, int(epoch[b]), d).to(self.device)
            self._epoch[b] = epoch[b]
        first = ((self.step % per_epoch) * bs).to(self.device)[:, None]
        slots = torch.gather(self._order, 1, first + torch.arange(bs, device=self.device))
        x = torch.gather(self.train_x, 2, slots.expand(len(self.train_x), -1, -1))
        y = torch.gather(self.train_y, 1, slots)
        valid = torch.ones(B, bs, dtype=torch.bool, device=self.device)
        return x, y, valid, torch.full((B,), float(bs), device=self.device)

    def dropout_masks(self, models: slice = slice(None), d_max: int | None = None) -> torch.Tensor | None:
        """Draw this step's masks (len(models), d_max, units) for a slice of the models (each has its own stream,
        so slices drawn in any order give the same masks): model b's is reference.dropout_mask((d_b, units)), d_b
        the examples it sees this step (batch_counts)."""
        ids = range(len(self))[models]
        if all(self._dropout_gens[b] is None for b in ids):
            return None
        counts = self.batch_counts
        units = self.family.dropout_units(self.settings, self.width)
        masks = torch.ones(len(ids), d_max or int(counts.max()), units, device=self.device)
        for i, b in enumerate(ids):
            if (g := self._dropout_gens[b]) is not None:
                d = int(counts[b])
                masks[i, :d] = reference.dropout_mask((d, units), self.hypers[b].dropout, g, self.device)
        return masks

    def weights(self) -> dict[str, torch.Tensor]:
        """What the weights file of a population holds: the family's tensors and the model ids."""
        return {**self.tensors, "model": torch.tensor(self.model_ids)}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy saved weights (results.read_weights, one row per model of this population) into it."""
        for name, t in self.tensors.items():
            t.copy_(weights[name])

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

    def model(self, b: int):
        """Model b as its family's reference nn.Module (a copy of its current weights)."""
        h = self.hypers[b]
        return self.family.reference(self.settings.with_op(h.op), h, {k: t[b] for k, t in self.tensors.items()})

    @torch.no_grad()
    def evaluate(self, engine=None, max_bytes: int | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every metric of every model on all pairs (no dropout): a dict of (B,) float64 CPU tensors.

        train_*: training set against the labels trained on; test_*: held-out pairs (true labels);
        clean_acc: uncorrupted training examples; corrupted_acc: corrupted examples against their corrupted
        labels (memorized); inverted_acc: corrupted examples against their true labels. NaN where the subset
        is empty (corrupted_acc of a model with xi = 0).

        `engine` (a backend; default: the family's torch forward) runs the forward pass for chunks of models whose
        working memory, engine.eval_bytes(settings, width) per example, fits `max_bytes` (default:
        eval_limit(device)); a model whose own evaluation does not fit goes through its pairs in spans that do.
        `tensors` (default: the population's) evaluates other weights of the same shapes (pruned ones).
        """
        max_bytes = eval_limit(self.device) if max_bytes is None else max_bytes
        tensors = self.tensors if tensors is None else tensors
        s, family = self.settings, self.family
        outputs = engine.outputs if engine is not None else family.outputs
        per_example = (engine if engine is not None else family).eval_bytes(s, self.width)
        x_all, z_all = self.table
        P, B, d_max = z_all.shape[1], len(self), self.train_y.shape[1]
        chunk = max(1, min(B, max_bytes // (P * per_example)))
        span = P if chunk > 1 else max(1, min(P, max_bytes // per_example))
        out = {k: [] for k in METRICS}
        for lo in range(0, B, chunk):
            sl = slice(lo, min(B, lo + chunk))
            D, c = self.D[sl].to(self.device)[:, None], self.n_corrupt[sl].to(self.device)[:, None]
            part = {name: t[sl] for name, t in tensors.items()}
            sums, counts = {}, {}  # per model: each metric's sum and each subset's size, added up span by span
            for start in range(0, P, span):
                stop = min(P, start + span)
                perm = self.perm[sl, start:stop]  # the model's slots in its order: training slots first
                true = z_all[self.task[sl, None], perm]
                labels = true.clone()  # as trained on: corrupted labels on the training slots
                t = max(0, min(stop, d_max) - start)
                labels[:, :t] = torch.where(self.valid[sl, start : start + t], self.train_y[sl, start : start + t],
                                            true[:, :t])
                pred, loss = outputs(part, x_all[:, perm], labels, s)
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
