"""Skip marks for what a torch release lacks; fused_adagrad._compat decides which release has it."""
import pytest
import torch

from fused_adagrad import _compat

needs_compilable_op = pytest.mark.skipif(
    not _compat.CAN_COMPILE_STEP,
    reason=f"torch {torch.__version__} cannot functionalize an op that mutates lists of tensors "
           f"(opcheck, torch.compile): torch >= {'.'.join(map(str, _compat.COMPILE_MIN_TORCH))}")


def cuda_majors():
    """(torch's CUDA major, the machine's nvcc CUDA major), each "none" when absent. A CUDA torch's
    own CMake config wants a toolkit of its major for any C++ program (tests/torch_version.sh)."""
    import re
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        found = re.search(r"release (\d+)",
                          subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    except OSError:
        found = None
    return (torch.version.cuda or "none").split(".")[0], found.group(1) if found else "none"
