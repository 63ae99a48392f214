"""Skip marks for what a torch release lacks; fused_adagrad._compat decides which release has it."""
import pytest
import torch

from fused_adagrad import _compat

needs_compilable_op = pytest.mark.skipif(
    not _compat.CAN_COMPILE_STEP,
    reason=f"torch {torch.__version__} cannot functionalize an op that mutates lists of tensors "
           f"(opcheck, torch.compile): torch >= {'.'.join(map(str, _compat.COMPILE_MIN_TORCH))}")
