"""What differs between the torch releases fused-adagrad supports (2.4 to 2.15), in one place."""
import torch
from packaging.version import Version

TORCH_RELEASE = Version(torch.__version__).release[:2]

# torch.compile functionalizes a custom op that mutates lists of tensors (our ops' Tensor(a!)[]
# params, sums and steps) from torch 2.5 on; 2.4 refuses any such op while tracing. There, a
# compiled function that calls opt.step() breaks its graph before the step, which runs eagerly
# (same numbers); fullgraph=True and torch.library.opcheck fail.
COMPILE_MIN_TORCH = (2, 5)
CAN_COMPILE_STEP = TORCH_RELEASE >= COMPILE_MIN_TORCH


def eager_under_compile(op):
    """The op as the optimizers call it: on a torch that cannot compile it, kept out of the
    traced graph (dynamo breaks the graph there and runs the op eagerly)."""
    if CAN_COMPILE_STEP:
        return op
    import torch._dynamo
    return torch._dynamo.disable(op)
