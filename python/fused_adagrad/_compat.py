"""What differs between the torch releases fused-adagrad supports (2.4 to 2.15), in one place."""
import torch
from packaging.version import Version

TORCH_RELEASE = Version(torch.__version__).release[:2]

# torch.compile functionalizes a custom op that mutates lists of tensors (our ops' Tensor(a!)[]
# params, sums and steps) from torch 2.5 on; 2.4 refuses any such op while tracing.
COMPILE_MIN_TORCH = (2, 5)
CAN_COMPILE_STEP = TORCH_RELEASE >= COMPILE_MIN_TORCH


def check_step_compilable(who: str) -> None:
    """Raises, while torch.compile traces a step, on a torch that cannot compile our op: a clear
    message instead of an error from inside torch's functionalization."""
    if not CAN_COMPILE_STEP and torch.compiler.is_compiling():
        raise RuntimeError(
            f"{who}: torch.compile of an optimizer step needs torch >= "
            f"{'.'.join(map(str, COMPILE_MIN_TORCH))} (this is torch {torch.__version__}, whose "
            "torch.compile cannot trace an op that updates lists of tensors in place); run the "
            "step outside the compiled function, or upgrade torch")
