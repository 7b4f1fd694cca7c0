"""Settings a process makes once, where a run on the CPU starts (training, benchmarks, pruning): glibc's malloc, and
denormal floats flushed to zero.

Weight decay drives weights and Adam moments towards zero, through the range of denormal floats, which x86 CPUs
compute slowly: the default `fastgrok train` (cpu-demo) stepped in 25 ms up to step 750, then 33, 58, 86, 107 and
114 ms by step 2000 (2-core AMD EPYC, torch 2.13, 2026-12-01), 117-119 s of steps in all. Flushed, every step takes
25 ms and the run 48.5 s, with models.csv byte-identical; about 7% of the weights differ, each by at most 3.5e-30
(values that were denormal). A deep MLP at weight decay 5-8 ran at 136 model-steps/s without it.

glibc's malloc, left to itself, hands freed memory at the top of its heap back to the kernel as soon as twice its
(adaptive) mmap threshold is free there, and maps buffers above that threshold afresh each time: every torch step's
buffers were then faulted in again page by page (the cpu-demo: 2.4M minor page faults in 300 steps, a third of its
step time in the kernel). CPU_MALLOC serves buffers up to 32 MiB (glibc's largest threshold) from the heap and keeps
up to 256 MiB of it mapped. bench/torch_knobs.py --knob malloc against glibc's own, two runs on the 2-core AMD EPYC
development machine (bench/results/cpu-2core-malloc*.json): the cpu-demo population 1.44-1.89x faster, 16 models
of p 97 at N 128 1.30-1.65x and at N 500 1.33-1.41x; one model of N 500, 9 of alpha 0.1-0.9 and 128 models (whose
optimizer buffers are over 32 MiB, mapped either way) 0.95-1.16x, within the noise; the largest resident memory of
short runs within 8%. M_TOP_PAD (64 MiB) instead was as fast on the cpu-demo, but it fixes the mmap threshold at
128 KiB: 16 models of N 500 ran 2.4x slower.
"""

from __future__ import annotations

import ctypes
import os

CPU_MALLOC = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 256 << 20}
_MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # malloc.h
_done = False


def tune_cpu() -> None:
    """Both settings, once per process; the reference a run is tested against computes under them too."""
    import torch

    tune_cpu_malloc()
    torch.set_flush_denormal(True)


def tune_cpu_malloc() -> None:
    """Apply CPU_MALLOC once per process (mallopt cannot be undone): under glibc only, and never over a user's own
    MALLOC_* variables or GLIBC_TUNABLES."""
    global _done
    if _done:
        return
    _done = True
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
