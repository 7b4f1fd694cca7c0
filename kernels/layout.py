"""Host side of the Triton step: the layout of its buffers in memory, their sizes, the tiles' fit, and the one
launch loop. Imports no triton, so that the memory planner (fastgrok/planner.py, through the MLP's TritonBackend)
counts the kernels' bytes from the functions the launchers allocate with, on machines without triton too.

    G      (B, Dmax, g_row(p))    the output gradient, g_dtype: rows of p padded with zeros to 16 bytes
    WT     (B, p, w_row(N))       the forward's transposed copy of W, w_dtype: rows of N padded with zeros to 16
    BITS   (B, words(N), Dmax)    int32 dropout mask bits (kernels/dropout.py)
    M, N_, Y, LOSS (B, Dmax)      int32 example indices and labels in the kernels' slot order; fp32 losses

Rows are padded to 16 bytes so that the kernels move them in 16-byte vectors; `alignment` tells a kernel how far
its sizes and strides allow it.
"""

import torch

# CUDA caps a grid's second axis, the kernels' model axis, at 65535 programs: `launch` slices larger populations.
MAX_GRID_Y = 65535


def cdiv(a: int, b: int) -> int:
    """a / b rounded up."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def block_p(p: int) -> int:
    """p padded to a power of two (at least 16, a dot's smallest side): the kernels' tiles span P = block_p(p)."""
    return max(16, next_power_of_2(p))


def fit(block_d: int, block_n: int, p: int) -> tuple[int, int]:
    """Tiles chosen for P <= 128 (where every default was measured), shrunk for a larger P so that each tile of G,
    W and the accumulators holds as many elements as at P 128: at p 500 (P 512) the default backward would
    otherwise ask for 400 KB of shared memory, past the H100's 227 KB (bench/kernel_resources.py --check compiles
    the step at P 256 and 512). Correct at any p <= 512; not tuned above 128."""
    factor = max(1, block_p(p) // 128)
    return max(16, block_d // factor), max(16, block_n // factor)


def g_dtype(precision: str) -> torch.dtype:
    """G's type in memory: bf16 in bf16, where both of the backward's dots round it to bf16 anyway (the same
    round-to-nearest-even as the store), so storing it rounded changes no result and halves the bytes the
    backward reads per tile of neurons; fp32 otherwise."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def w_dtype(precision: str) -> torch.dtype:
    """The type of the forward's copy of W: the dots' input type, bf16 in bf16 (W rounded once, as the dot would
    round it), fp32 otherwise. The parameters stay fp32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def g_row(p: int, precision: str = "fp32") -> int:
    """The row length of G in memory: p padded to 16 bytes (4 fp32 or 8 bf16 elements)."""
    per = 16 // g_dtype(precision).itemsize
    return cdiv(p, per) * per


def w_row(width: int) -> int:
    """The row length of the forward's transposed copy of W: N padded to a multiple of 16 elements."""
    return cdiv(width, 16) * 16


def words(width: int) -> int:
    """32-bit words of one example's dropout mask (kernels/dropout.py)."""
    return cdiv(width, 32)


def alignment(*sizes: int, most: int = 16) -> int:
    """The largest power of two, up to `most`, that divides every one of `sizes` (row lengths and strides, in
    elements): a kernel told it (through hidden.aligned) loads and stores rows in 16-byte vectors."""
    align = most
    while align > 1 and any(size % align for size in sizes):
        align //= 2
    return align


def launch(kernel, tiles: int, models: int, per_model, *args, **meta) -> None:
    """kernel[(tiles, k)](*slices, *args, **meta) for consecutive slices of at most MAX_GRID_Y of the `models`
    models: per_model are the tensors whose first axis is the model (the kernel's first arguments, each sliced
    alike), args the rest (sizes, strides), meta the meta-parameters and launch options."""
    for lo in range(0, models, MAX_GRID_Y):
        hi = min(models, lo + MAX_GRID_Y)
        kernel[(tiles, hi - lo)](*(t[lo:hi] for t in per_model), *args, **meta)


def step_bytes(p: int, width: int, d: int, precision: str, dropout: bool) -> int:
    """Device memory one model's Triton training step holds beyond its parameters, gradients, moments and data,
    for d examples: per-example losses and the int32 copies of m, n, y in the kernels' slot order (4 x 4 d); G,
    d rows of g_row(p) in g_dtype; the forward's copy of W, p rows of w_row(N) in w_dtype; with dropout the step's
    mask bits, words(N) int32 per example. Nothing of size d N is ever stored."""
    g, w = g_dtype(precision).itemsize, w_dtype(precision).itemsize
    work = 4 * 4 * d + g * d * g_row(p, precision) + w * p * w_row(width)
    return work + (4 * words(width) * d if dropout else 0)


def eval_bytes(width: int, p: int) -> int:
    """Working memory per example of the evaluation kernel's pass (TritonBackend.outputs under
    Population.evaluate): the int64 indices and labels the evaluation builds and their temporaries (6 x 8), the
    kernel's int32 copies of m, n, y (3 x 4), its predictions widened to int64 (8) and its fp32 losses (4). Not
    a function of N or p: the kernel keeps the hidden layer and the outputs on chip."""
    return 6 * 8 + 3 * 4 + 8 + 4
