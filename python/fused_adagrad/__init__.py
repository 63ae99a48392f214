"""fused-adagrad: torch.optim.Adagrad's numbers from one fused pass per element (CPU and CUDA).

    from fused_adagrad import FusedAdagrad, RowWiseAdagrad
    opt = FusedAdagrad(model.parameters(), lr=0.01)   # same arguments as torch.optim.Adagrad
    emb_opt = RowWiseAdagrad(embeddings.parameters())  # one accumulator per row
"""
import os

import torch
from packaging.version import Version

from ._version import __version__, built_with_torch


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


_C = _load_native()  # also registers torch.ops.fused_adagrad.*

from .optimizer import FusedAdagrad  # noqa: E402
from .rowwise import RowWiseAdagrad  # noqa: E402


# For C++ programs, like torch.utils.cmake_prefix_path: with both in CMAKE_PREFIX_PATH,
# find_package(FusedAdagrad) finds the config, library and headers this package ships.
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")


def build_info() -> dict:
    """Version, torch built against, SIMD kernels compiled in and the one this CPU uses, CUDA."""
    return _C.build_info()


__all__ = ["FusedAdagrad", "RowWiseAdagrad", "build_info", "cmake_prefix_path", "__version__"]
