"""fused-adagrad: torch.optim.Adagrad's numbers from one fused pass per element (CPU and CUDA).

    from fused_adagrad import FusedAdagrad, RowWiseAdagrad
    opt = FusedAdagrad(model.parameters(), lr=0.01)   # same arguments as torch.optim.Adagrad
    emb_opt = RowWiseAdagrad(embeddings.parameters())  # one accumulator per row
    bags = FusedEmbeddingBags([(1_000_000, 64)] * 8)     # tables stepped inside backward
"""
import os

import torch
from packaging.version import Version

from ._version import __version__, built_with_torch, cuda_not_built_because


def _load_native():
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            f"fused_adagrad's native module failed to load ({e}). It was built against torch "
            f"{built_with_torch}; this process runs torch {torch.__version__}. Reinstall it against "
            "the torch you run: pip install --no-build-isolation --force-reinstall fused-adagrad"
        ) from e
    built, running = Version(_C.build_info()["torch_version"]), Version(torch.__version__)
    if (built.major, built.minor) != (running.major, running.minor):
        raise ImportError(
            f"fused_adagrad was built against torch {built} but this process runs torch "
            f"{torch.__version__}; the C++ ABI differs between minor versions. Reinstall it: "
            "pip install --no-build-isolation --force-reinstall fused-adagrad"
        )
    return _C


def _check_cpu_kernel_request():
    """FUSED_ADAGRAD_CPU_KERNEL (or FUSED_ADAGRAD_MAX_ISA) asked for a kernel this CPU cannot
    run: say so now, where the process asked for it, rather than at its first step."""
    error = _C.build_info()["cpu_kernel_error"]
    if error:
        raise RuntimeError(error)


_C = _load_native()  # also registers torch.ops.fused_adagrad.*
_check_cpu_kernel_request()

from .optimizer import FusedAdagrad  # noqa: E402
from .rowwise import RowWiseAdagrad  # noqa: E402
from .embedding_bags import FusedEmbeddingBags  # noqa: E402


# For C++ programs, like torch.utils.cmake_prefix_path: with both in CMAKE_PREFIX_PATH,
# find_package(FusedAdagrad) finds the config, library and headers this package ships.
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")


def build_info() -> dict:
    """What this build is and what it runs here, without raising and without touching CUDA:
    version, torch_version (built against), cpu_kernels (compiled in), cpu_kernels_runnable (by
    this CPU), cpu_kernel (the one steps use), cuda (kernels compiled in), cuda_archs (built
    for), cuda_devices (GPUs usable now), cuda_launch (how work is split into launches), and
    cuda_not_built_because (why the build left the CUDA kernels out; "" when built or not asked)."""
    return {**_C.build_info(), "cuda_not_built_because": cuda_not_built_because}


__all__ = ["FusedAdagrad", "RowWiseAdagrad", "FusedEmbeddingBags", "build_info", "cmake_prefix_path", "__version__"]
