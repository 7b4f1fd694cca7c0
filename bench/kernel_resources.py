"""The compiler's resource report for every Triton kernel, without a GPU: registers, spills (stack), shared
memory, the matrix instructions (Hopper's wgmma, or the older mma.sync path) and the width of the global memory
accesses of each kernel, precision and tile, compiled ahead of time for sm_90 (H100/H200) with the ptxas that ships
in the triton wheel, specialised as Triton's launcher specialises them at the paper's shape (SHAPE).

    python bench/kernel_resources.py              # the table
    python bench/kernel_resources.py --check      # each precision's default step (kernels/backward.py STEP;
                                                  # kernels/block.py BLOCK_STEP for the block kernels):
                                                  # exit 1 if a kernel fails to compile, if a tf32/bf16
                                                  # kernel misses wgmma or spills more than the GPU accepted,
                                                  # if the step at P 128, 256 or 512 (tiles shrunk by
                                                  # kernels/layout.py fit) needs more shared memory than an SM has,
                                                  # or if a loop that could be pipelined waits for a tile load

Runs with TRITON_INTERPRET unset (the interpreter replaces kernels with Python functions)."""

import argparse
import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastgrok.kernels import backward, block, dropout, forward, layout  # noqa: E402
from fastgrok.kernels.backward import _backward_kernel  # noqa: E402
from fastgrok.kernels.block import _block_backward_kernel, _block_forward_kernel  # noqa: E402
from fastgrok.kernels.dropout import _mask_kernel  # noqa: E402
from fastgrok.kernels.forward import _forward_kernel  # noqa: E402
from fastgrok.kernels.layout import alignment  # noqa: E402
from fastgrok.kernels.optimizer import _optimizer_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TYPES = {
    **{n: "*fp32" for n in ("U", "V", "W", "WT", "G", "LOSS", "INV_KEEP", "DU", "DV", "DW", "PARAM", "GRAD", "EXP_AVG",
                            "EXP_AVG_SQ", "DECAY", "L2", "STEP_SIZE", "BIAS2_SQRT", "BETA1", "BETA2", "EPS")},
    **{n: "*i32" for n in ("M", "N_", "Y", "COUNT", "PRED", "BITS")},
    "BLOCKS": "*i32", "SEED": "*i64", "THRESHOLD": "*i64", "ACTIVE": "*i8", "step_key": "i64",
}
FORWARD = tuple(forward.TILES[n] for n in ("block_d", "block_n", "num_warps"))
# The integer arguments at the paper's shape (p 97, N 500, alpha 0.5: 4704 examples). Triton's launcher tells the
# compiler which integers are multiples of 16 (and that tensors are 16-byte aligned); ALIGN_N / ALIGN_P tell it the
# rest (kernels/hidden.py `aligned`).
P, WIDTH, D_MAX = 97, 500, 4704
G_ROW, WT_ROW = layout.g_row(P), layout.w_row(WIDTH)  # G's row in bf16: G_ROW_BF16 (layout.g_dtype)
SHAPE = {"p": P, "width": WIDTH, "side": block.block_side(P), "numel": P * WIDTH,
         "stride_ub": P * WIDTH, "stride_up": WIDTH, "stride_vb": P * WIDTH, "stride_vp": WIDTH,
         "stride_wb": WIDTH * P, "stride_wn": P, "stride_tb": P * WT_ROW, "stride_tp": WT_ROW, "stride_ib": D_MAX,
         "stride_bb": block.block_count(P) ** 2 + 1, "stride_gb": D_MAX * G_ROW, "stride_gd": G_ROW}
ALIGN = {"ALIGN_N": alignment(WIDTH, P * WIDTH), "ALIGN_P": alignment(D_MAX * G_ROW, G_ROW)}
G_ROW_BF16 = layout.g_row(P, "bf16")
SHAPE_BF16 = {**SHAPE, "stride_gb": D_MAX * G_ROW_BF16, "stride_gd": G_ROW_BF16}
ALIGN_BF16 = {**ALIGN, "ALIGN_P": alignment(D_MAX * G_ROW_BF16, G_ROW_BF16)}


def backward_default(precision: str, scatter: str = "window") -> tuple:
    """The backward's tile in the Triton step at this precision with this scatter (kernels/backward.py, or
    kernels/block.py for "block"): (block_d, block_n, num_warps), and num_stages where the default sets it."""
    tiles = (block if scatter == "block" else backward).default_step(precision)[1]
    return tuple(tiles[n] for n in ("block_d", "block_n", "num_warps", "num_stages") if n in tiles)


# Spills the GPU measurement accepted (kernels/backward.py STEP): the one fused backward launch spills and still
# ran fastest on an H100 under Triton 3.6 (tf32 36.7k model-steps/s against 32.1k for two launches that do not
# spill; bf16 16.9k against 9.5k), measured when it spilled 936 B (tf32, 4 warps) and 80 B (bf16, 8 warps)
# compiled without the launcher's specialisation. At the paper's shape (SHAPE) it spills 648 B (tf32) and 152 B
# (bf16) under 3.6; bf16's bound is unconfirmed on a GPU (docs/performance.md). More is a regression to look at.
ACCEPTED_SPILL = {("fused windowed", "tf32"): 1024, ("fused windowed", "bf16"): 256}
# Kernels whose tile loop holds no other loop, so that Triton's pipeliner can make all its loads asynchronous.
PIPELINED = ("forward", "evaluate", "forward block", "backward dW", "dU dV block", "fused block")
# Shared memory one program may use on an H100 or H200 (227 KB; more fails at launch with OutOfResources).
SHARED_LIMIT = 232448


def resources(fn, constexprs: dict, num_warps: int, num_stages: int | None = None) -> dict:
    # in bf16 the forward's copy of W and G are bf16 (layout.w_dtype, layout.g_dtype)
    bf16 = constexprs.get("PRECISION") == "bf16"
    types, shape, align = ({**TYPES, "WT": "*bf16", "G": "*bf16"}, SHAPE_BF16, ALIGN_BF16) if bf16 else (TYPES, SHAPE, ALIGN)
    constexprs = {**{k: v for k, v in align.items() if k in fn.arg_names}, **constexprs}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n].startswith("*") or shape.get(n, 1) % 16 == 0}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                            options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in report.splitlines() if "REG:" in line for item in line.split() if ":" in item)
    ptx = kernel.asm["ptx"]
    # "async": loads the software pipeliner turned into asynchronous copies (0: every load of the main loop waits
    # for memory; the pipeliner skips a loop that holds another loop, like the windowed scatter's)
    regs, shared = int(fields["REG"]), kernel.metadata.shared
    return {"regs": regs, "stack": int(fields["STACK"]), "shared": shared,
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync"),
            "async": kernel.asm["ttgir"].count("async_copy_global_to_local"), "waited": waited_loads(kernel.asm["ttgir"]),
            "per_sm": programs_per_sm(regs, shared, num_warps), **access_widths(ptx)}


def waited_loads(ttgir: str) -> int:
    """Loads of 2-D tiles that the innermost loops wait for: plain loads (not asynchronous copies) in the body of
    an scf.for that holds no other loop. The "async" count alone misleads: in tf32 the fused block backward copied
    its example indices asynchronously but waited for its G tile on every iteration unless it reads G twice
    (kernels/block.py G_TWICE, docs/performance.md)."""
    waited, stack = 0, []  # stack: (indentation, loads so far, holds a loop) of the open scf.for bodies
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while stack and line.strip() and indent <= stack[-1][0]:
            _, loads, nested = stack.pop()
            waited += 0 if nested else loads
        if "scf.for" in line:
            if stack:
                stack[-1][2] = True
            stack.append([indent, 0, False])
        elif stack and " tt.load " in line and re.search(r"tensor<\d+x\d+x", line):
            stack[-1][1] += 1
    return waited


def access_widths(ptx: str) -> dict:
    """Global loads, stores and asynchronous copies in the PTX: how many move 16 bytes a thread ("vector"), of
    all of them ("accesses"). A tile's row moved one element a thread at a time costs four times the
    instructions (and in bf16 two-byte loads cannot even be asynchronous)."""
    sizes = [int(size, 0) for size in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*[,;]", ptx)]
    vector = sum(size == 16 for size in sizes)
    plain = re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9_:]+)*?(\.v[248])?\.[bfsu](\d+)\b", ptx)
    vector += sum(int((v or ".v1")[2:]) * int(bits) == 128 for v, bits in plain)
    return {"vector": vector, "accesses": len(sizes) + len(plain)}


def programs_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Programs of this kernel an H100 SM holds at once (64K registers, allocated 256 per warp; 228 KB of shared
    memory, 1 KB of it reserved per program; 64 warps). One program of 4 warps leaves the SM's other three
    schedulers idle unless its loads are pipelined."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 233472 // (shared + 1024), 64 // num_warps)


def table(precisions, tiles, backward_tiles=None, block_p=128, step_only=False, variants=False):
    """Every kernel at each of `tiles` (block_d, block_n, num_warps); the backward ones at `backward_tiles`
    (a function of the precision and scatter) instead when given, with the fused windowed backward where it is the
    default. block_p: p padded inside the kernels; above 128 the tiles shrink as the launchers shrink them
    (layout.fit). step_only: only the kernels the default step and evaluation launch. variants: also the
    fused block backward reading G once in tf32 (a sweep option, not a default)."""
    def fit(tile):
        return (*layout.fit(tile[0], tile[1], block_p), *tile[2:])

    rows = []
    for precision, tile in itertools.product(precisions, tiles):
        def common(block_d, block_n, *_):
            return dict(ACT=0, DROPOUT=True, PRECISION=precision, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_P=block_p)

        back = fit(backward_tiles(precision) if backward_tiles else tile)
        blocked = fit(backward_tiles(precision, "block") if backward_tiles else tile)
        tile = fit(tile)
        fused = backward_tiles is not None and backward.default_step(precision)[0]
        window = backward.WINDOW
        kernels = {
            "forward": (_forward_kernel, tile, dict(LOSS_KIND=0, TRAIN=True)),
            "evaluate": (_forward_kernel, tile, dict(LOSS_KIND=0, TRAIN=False, DROPOUT=False)),
            "forward block": (_block_forward_kernel, tile, dict(LOSS_KIND=0, TRAIN=True)),
            "backward dW": (_backward_kernel, back, dict(WITH_W=True, WITH_UV=False, WINDOW=window)),
            "dU dV windowed": (_backward_kernel, back, dict(WITH_W=False, WITH_UV=True, WINDOW=window)),
            "dU dV block": (_block_backward_kernel, blocked, dict(WITH_W=False, G_TWICE=False)),
            "fused block": (_block_backward_kernel, blocked, dict(WITH_W=True,
                                                                  G_TWICE=precision in block.G_TWICE_PRECISIONS and
                                                                  block.default_step(precision)[1].get("g_twice", True))),
        }
        if fused:
            kernels["fused windowed"] = (_backward_kernel, back, dict(WITH_W=True, WITH_UV=True, WINDOW=window))
        if variants and precision in block.G_TWICE_PRECISIONS:  # kernels/block.py backward(g_twice=False)
            kernels["fused block G once"] = (_block_backward_kernel, blocked, dict(WITH_W=True, G_TWICE=False))
        for name, (fn, t, constexprs) in kernels.items():
            if not step_only or in_step(name, precision):
                rows.append({"kernel": name, "precision": precision, "tile": t, "P": block_p,
                             "job": (fn.__name__, {**common(*t), **constexprs}, *t[2:])})
    if not step_only:
        rows.append({"kernel": "optimizer", "precision": "fp32", "tile": (1024, 0, 4), "P": 0,
                     "job": ("_optimizer_kernel", dict(MODE=0, BLOCK=1024, ALIGN=alignment(P * WIDTH)), 4)})
        rows.append({"kernel": "dropout masks", "precision": "-", "tile": (dropout.BLOCK_D, 32, 4), "P": 0,
                     "job": ("_mask_kernel", dict(BLOCK_D=dropout.BLOCK_D), 4)})
    return rows


KERNELS = {fn.__name__: fn for fn in (_forward_kernel, _backward_kernel, _block_forward_kernel, _block_backward_kernel,
                                      _optimizer_kernel, _mask_kernel)}


def compile_job(job) -> dict:
    name, constexprs, *launch = job  # num_warps[, num_stages]
    return resources(KERNELS[name], constexprs, *launch)


def compile_rows(rows: list) -> list:
    """Each row's resources, its kernel compiled on every host core."""
    with concurrent.futures.ProcessPoolExecutor() as pool:
        return [{**row, **found} for row, found in zip(rows, pool.map(compile_job, [r.pop("job") for r in rows]))]


def in_step(kernel: str, precision: str) -> bool:
    """Whether TritonBackend's default step (or its evaluation) at `precision` launches `kernel`."""
    fused = backward.default_step(precision)[0]
    unfused = ("backward dW", "dU dV windowed")
    return kernel not in ("forward block", "dU dV block", "fused block",
                          *(unfused if fused else ("fused windowed",)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="default tiles only; fail on spills in fast modes")
    args = parser.parse_args()
    precisions = ("fp32", "tf32", "tf32x3", "bf16")
    if args.check:
        rows = table(precisions, [FORWARD], backward_default)
        rows += [r for block_p in (256, 512) for r in table(precisions, [FORWARD], backward_default, block_p, True)]
    else:
        rows = table(("tf32", "tf32x3", "bf16"), [(32, 32, 4), (32, 64, 4), (32, 64, 8), (64, 32, 4), (64, 64, 4),
                                                  (64, 64, 8), (128, 64, 8), (32, 128, 8), (64, 128, 8)], variants=True)
    rows = compile_rows(rows)
    for r in rows:
        print(f"{r['kernel']:>18} {r['precision']:>7} P {r['P']:>3} tile {r['tile']}: {r['regs']:>3} regs, "
              f"{r['stack']:>6} B stack (spills), {r['shared']:>6} B shared, {r['wgmma']:>3} wgmma {r['mma']:>3} mma.sync, "
              f"{r['async']:>2} async loads, {r['waited']} waited, {r['vector']:>3}/{r['accesses']:<3} 16-byte accesses, "
              f"{r['per_sm']} per SM")
    if not args.check:
        return
    # fp32 (IEEE products) is the parity mode and tf32x3 splits both operands of every dot (3 dots): they may
    # spill. tf32 and bf16 are the speed modes: at the default tiles (P 128, where they were measured) they must
    # not spill, and the kernels the default step runs must reach Hopper's wgmma (a kernel left on mma.sync is on
    # the slower path). At any P every kernel must fit an SM's shared memory, or it cannot launch.
    speed = [r for r in rows if r["precision"] in ("tf32", "bf16") and r["P"] <= 128]
    fast = [r for r in speed if in_step(r["kernel"], r["precision"])]
    problems = [f"{r['kernel']} {r['precision']}: spills {r['stack']} B" for r in fast
                if r["stack"] > ACCEPTED_SPILL.get((r["kernel"], r["precision"]), 0)]
    problems += [f"{r['kernel']} {r['precision']}: no wgmma" for r in fast if r["kernel"] != "optimizer" and not r["wgmma"]]
    problems += [f"{r['kernel']} {r['precision']} at P {r['P']}: {r['shared']} B of shared memory" for r in rows
                 if r["shared"] > SHARED_LIMIT]
    # every kernel whose loop holds no other loop must have all its tile loads pipelined (the windowed scatter's
    # nested window loop cannot be, by design); the block scatter's too (kernels/block.py), though not the default
    problems += [f"{r['kernel']} {r['precision']}: waits for {r['waited']} tile loads in its loop" for r in speed
                 if r["kernel"] in PIPELINED and r["waited"]]
    if problems:
        print("at the default tiles: " + "; ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
