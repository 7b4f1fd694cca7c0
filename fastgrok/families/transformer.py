"""The authors' encoder-only transformer (fastgrok.reference.Transformer; the paper's Fig. 7a), as a population.

Population layout: each of the reference's tensors stacked as (B, *shape) under its name (transformer_names),
linear maps as nn.Linear holds them (out, in), so that model b is the reference with every tensor [b]. The forward
is batched over the models: embeddings by a gather of rows, every linear map one batched matmul, attention by
einsum over (model, example, head); the step is autograd through it (Family.grads). The width axis is d_model.

IPR and pruning work on the first block's MLP neurons: neuron k's input weights through the token embedding over
the p tokens, (E W_fc^T)[:, k], and its output weights through the unembedding over the p outputs,
(U W_proj)[:, k]; a pruned neuron's W_fc row is zero, so its activation is phi(0) = 0 in every example. Each of
the d dimensions of the token embedding and of the unembedding over the p tokens has an IPR as well, whose mean
`fastgrok ipr` reports per model (embed_ipr, unembed_ipr). With weight tying (Settings.tie) there is no
unembedding tensor: the token embedding reads out too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgrok import reference
from fastgrok.errors import ConfigError
from fastgrok.families import Family, Spec, register


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, ..., in) through each model's map (B, out, in): (B, ..., out), one batched matmul."""
    B = x.shape[0]
    return torch.bmm(x.reshape(B, -1, x.shape[-1]), weight.transpose(1, 2)).view(*x.shape[:-1], weight.shape[1])


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim with each model's weight and bias (B, d), as F.layer_norm (eps 1e-5)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:], eps=1e-5), weight.view(shape))


class EncoderTransformer(Family):
    name = "transformer"
    options = ("layers", "heads", "layernorm", "scale", "tie")
    # A step does more arithmetic per byte of its widest row than the MLP's (attention, four maps per block), and
    # gains from pieces 4x the MLP's 4 MiB: model-steps/s at 4 MiB against 16 MiB, 2 threads of an Intel Xeon
    # (AVX-512), 2026-12-02: p 23, d 64, B 16 750 against 906, B 64 742 against 909; p 31, d 128, B 16 141 against
    # 174; p 47, d 128, B 16 73 against 98.
    cpu_piece_scale = 4
    about = ("embeddings, --layers blocks of --heads-head attention and a 4 d ReLU MLP, residuals, no biases, the "
             "readout at the last position (the paper's Fig. 7a); the width is d_model")

    def check(self, settings):
        super().check(settings)
        if settings.layers < 1 or settings.heads < 1:
            raise ConfigError(f"--layers and --heads must be at least 1, got {settings.layers} and {settings.heads}")
        reference.check_choice("scale", settings.scale, reference.SCALES)

    def check_widths(self, settings, widths):
        for d in widths:
            if d % settings.heads:
                raise ConfigError(f"--heads {settings.heads} does not divide d_model (--width) {d}")

    def tensors(self, settings, width):
        shapes = reference.transformer_shapes(settings.p, width, settings.layers, settings.layernorm, settings.tie)
        return {name: Spec(shape, decay="_ln" not in name) for name, shape in shapes.items()}

    def init(self, settings, width, generator):
        return reference.transformer_init(settings.p, width, settings.layers, settings.layernorm, generator,
                                          settings.tie)

    def forward(self, t, x, settings, mask=None):
        m, n = x
        B, D = m.shape
        p, d = t["embed"].shape[1:]
        H, dh = settings.heads, d // settings.heads
        s = reference.SCALES[settings.scale]
        act = reference.ACTIVATIONS[settings.act]
        ln = (lambda x, name: _layer_norm(x, t[f"{name}_weight"], t[f"{name}_bias"])) if settings.layernorm else (
            lambda x, name: x)
        # an example's embedded sequence is a row of a (B, 2 positions, p tokens, d) table at each position
        table = (t["embed"][:, None] + t["pos"][:, :, None]).reshape(B * 2 * p, d)
        rows = torch.stack([m, n + p], -1) + 2 * p * torch.arange(B, device=m.device)[:, None, None]  # (B, D, 2)
        qkv = first = None
        if mask is None and settings.layers == 1:  # the paper's model: see _single_block_attention
            x = table.index_select(0, rows[..., 1].reshape(-1)).view(B, D, 1, d)
            first = self._single_block_attention(t, table.view(B, 2, p, d), m, n, settings, ln)
        elif mask is None:  # so is the first block's q k v: 2 p rows a model through the map instead of 2 D
            qkv = _linear(ln(table.view(B, 2 * p, d), "block0_ln1"), t["block0_qkv"]).reshape(B * 2 * p, 3 * d)
            qkv = qkv.index_select(0, rows.reshape(-1)).view(B, D, 2, 3 * d)
            x = table.index_select(0, rows.reshape(-1)).view(B, D, 2, d)
        else:  # dropout on the embeddings makes every example's sequence its own
            x = table.index_select(0, rows.reshape(-1)).view(B, D, 2, d) * mask[..., : 2 * d].view(B, D, 2, d)
        at = 2 * d
        for k in range(settings.layers):
            # the readout needs the last block's output at the last position only: there, only its query, its
            # attention output and its MLP are computed (keys and values at both positions)
            last = k == settings.layers - 1
            if first is not None:
                y = first
            else:
                if k > 0 or qkv is None:
                    qkv = _linear(ln(x, f"block{k}_ln1"), t[f"block{k}_qkv"])
                # unbind, not three selections: each selection's backward would fill a zero tensor as large as qkv
                q, key, v = qkv.view(B, D, 2, 3, H, dh).unbind(3)
                q = q[:, :, 1:] if last else q
                # attention between 2 positions: products summed by broadcasting, not as batched 2 x 2 matmuls
                weights = torch.softmax((q[:, :, :, None] * key[:, :, None]).sum(-1) / dh ** ((1 + s) / 2), 3)
                if mask is not None:  # (B, D, query t, key s, head h) against the mask's (head, t, s) per example
                    weights = weights * mask[..., at : at + 4 * H].view(B, D, H, 2, 2).permute(0, 1, 3, 4, 2)[:, :, -q.shape[2]:]
                y = _linear((weights[..., None] * v[:, :, None]).sum(3).reshape(B, D, -1, d), t[f"block{k}_out"])
                if mask is not None:
                    y = y * mask[..., at + 4 * H : at + 4 * H + 2 * d].view(B, D, 2, d)[:, :, -y.shape[2]:]
                x = x[:, :, -1:] if last else x
            x = x + y
            h = _linear(act(_linear(ln(x, f"block{k}_ln2"), t[f"block{k}_fc"])), t[f"block{k}_proj"])
            if mask is not None:
                h = h * mask[..., at + 4 * H + 2 * d : at + 4 * H + 4 * d].view(B, D, 2, d)[:, :, -h.shape[2]:]
            x = x + h
            at += 4 * H + 4 * d
        last = ln(x, "final_ln")[:, :, -1]  # (B, D, d): the readout at the last position
        return d ** (-(1 + s) / 2) * _linear(last, t["embed" if settings.tie else "unembed"])

    @staticmethod
    def _single_block_attention(t, table, m, n, settings, ln):
        """A single block's attention output at the last position, without dropout, (B, D, 1, d). It depends on an
        example only through its tokens: the query of token n at position 1 against the key of token m at
        position 0 (a (p, p) table of scores per head and model) and against its own key (p scores), then the
        values of m and n. The tables cost p^2 d a model; per example only gathers and 2 d products remain, where
        the general path moves (2, 3 d) rows of q k v and (2, d) products through autograd."""
        B, D = m.shape
        p, d = table.shape[2:]
        H, dh = settings.heads, d // settings.heads
        scale = dh ** ((1 + reference.SCALES[settings.scale]) / 2)
        qkv = _linear(ln(table, "block0_ln1"), t["block0_qkv"]).view(B, 2, p, 3, H, dh)
        q, key, v = qkv[:, 1, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # q (B, p, H, dh); key, v (B, 2, p, H, dh)
        cross = torch.einsum("bnhe,bmhe->bnmh", q, key[:, 0]).reshape(B * p * p, H) / scale  # query n, key m
        own = (q * key[:, 1]).sum(-1).reshape(B * p, H) / scale
        model = torch.arange(B, device=m.device)[:, None]
        scores = torch.stack([cross.index_select(0, ((model * p + n) * p + m).reshape(-1)),
                              own.index_select(0, (model * p + n).reshape(-1))], -1)
        weights = torch.softmax(scores, -1).view(B, D, H, 2, 1)  # over the keys at positions 0 and 1
        values = v.reshape(B * 2 * p, H, dh)
        v0 = values.index_select(0, (model * 2 * p + m).reshape(-1)).view(B, D, H, dh)
        v1 = values.index_select(0, (model * 2 * p + p + n).reshape(-1)).view(B, D, H, dh)
        mixed = weights[..., 0, :] * v0 + weights[..., 1, :] * v1
        return _linear(mixed.reshape(B, D, 1, d), t["block0_out"])

    def reference(self, settings, hyper, t):
        width = t["embed"].shape[-1]
        net = reference.Transformer(settings.p, width, settings.layers, settings.heads, settings.act, hyper.dropout,
                                    settings.layernorm, settings.scale, tie=settings.tie)
        with torch.no_grad():
            for name, w in net.w.items():
                w.copy_(t[name])
        return net

    def dropout_units(self, settings, width):
        return reference.transformer_units(width, settings.layers, settings.heads)

    def units(self, settings, width):
        return 4 * width

    def ipr_parts(self, t):
        embed, unembed = t["embed"], t.get("unembed", t["embed"])  # (B, p, d); tied: one matrix
        return {"in": (torch.bmm(embed, t["block0_fc"].transpose(1, 2)), 1),  # (B, p, 4d): over the p tokens
                "out": (torch.bmm(unembed, t["block0_proj"]), 1)}  # (B, p, 4d): over the p outputs

    def ipr_extra(self, t):
        # each of the d dims over the p tokens (a tied unembedding is the embedding: reported once)
        return {"embed": (t["embed"], 1), **({"unembed": (t["unembed"], 1)} if "unembed" in t else {})}

    def prune(self, t, keep):
        return {**t, "block0_fc": t["block0_fc"] * keep[:, :, None]}

    def step_bytes(self, settings, width, d):
        """What autograd keeps and the backward adds, per example: layers (19 d + 4 heads) + 4 d + 2 p floats (with
        LayerNorm 6 d more a block). Fitted to the live memory of a step on the CPU (p 31-97, d 32-128, 1 and 2
        layers, within 7%; tests/test_deeper_families.py measures it again); glibc's default allocator fragments
        it, so a CPU process's resident peak runs up to twice this."""
        per_block = 19 * width + 4 * settings.heads + (6 * width if settings.layernorm else 0)
        return 4 * d * (settings.layers * per_block + 4 * width + 2 * settings.p)

    def eval_bytes(self, settings, width):
        """Without autograd one block's activations live at a time (a quarter of a step's), the logits and their
        loss terms, and the indices and labels the evaluation builds."""
        return 4 * (8 * width + 4 * settings.p) + 6 * 8

    def row_bytes(self, settings, width):
        return 4 * max(2 * 4 * width, settings.p)

    def flops(self, settings, width, d):
        """3 x the forward per example: per block at 2 positions q k v (12 d^2), attention's two products (16 d), its
        output map (4 d^2) and the MLP (32 d^2); the readout (2 d p)."""
        return 3 * d * (settings.layers * (48 * width * width + 16 * width) + 2 * width * settings.p)


TRANSFORMER = register(EncoderTransformer())
