"""The kernels compile for the GPU (sm_90, ahead of time, no GPU needed), which the interpreter tests cannot
show; the speed modes' default steps reach wgmma without spilling more than the GPU measurement accepted; every
loop that can be software-pipelined has all its tile loads asynchronous (a load that feeds two tf32 dots is not:
kernels/block.py G_TWICE); and
at every p the backend takes (P up to 512) each kernel of the step fits an SM's shared memory, or it could not
launch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists(),
                    reason="this triton build ships no NVIDIA toolchain")
def test_kernels_compile_for_sm90_without_spills_and_fit_shared_memory_at_any_p():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "bench/kernel_resources.py", "--check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # at P 128: 4 precisions x 7 kernels (forward, evaluation, backward dW, windowed dU dV, and kernels/block.py's
    # forward, dU dV and fused backward), the fused windowed backward of tf32 and bf16, the optimizer, the dropout
    # masks; at P 256 and 512 each precision's step and evaluation (fp32, tf32x3: forward, evaluation, two backward
    # launches; tf32, bf16: forward, evaluation, one fused backward)
    assert result.stdout.count("regs") == 60
