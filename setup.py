"""Builds fused_adagrad._C against the torch already installed: pip install --no-build-isolation .

The CUDA kernels in cuda/ are built when the installed torch has CUDA and nvcc is found
(TORCH_CUDA_ARCH_LIST picks the architectures; default sm_80 and sm_90); with
FUSED_ADAGRAD_REQUIRE_CUDA=1 the build fails instead of leaving them out."""
import glob
import os
import re

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = re.search(r'#define FUSED_ADAGRAD_VERSION "([^"]+)"',
                    open("csrc/fused_adagrad/fused_adagrad.h").read()).group(1)

# -ffp-contract=off: no fused multiply-add the source did not ask for (bitwise parity with torch);
# -fno-math-errno: lets the compiler vectorize sqrt. Never -march=native: one wheel, any x86-64.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]

# Read by the package's import check when the native module fails to load.
with open("python/fused_adagrad/_version.py", "w") as f:
    f.write(f'# Written by setup.py.\n__version__ = "{VERSION}"\nbuilt_with_torch = "{torch.__version__}"\n')

sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
macros = [("FUSED_ADAGRAD_BUILDING_LIBRARY", None)]
compile_args = {"cxx": CXX_FLAGS}
Extension = CppExtension
cuda_buildable = torch.version.cuda is not None and CUDA_HOME is not None
if os.environ.get("FUSED_ADAGRAD_REQUIRE_CUDA") == "1" and not cuda_buildable:
    # On a GPU machine, a silent CPU-only build would let the CUDA tests skip instead of run.
    raise SystemExit(f"FUSED_ADAGRAD_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: torch "
                     f"{torch.__version__} has CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}")
if cuda_buildable:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    Extension = CUDAExtension
    sources += sorted(glob.glob("cuda/*.cu"))
    macros.append(("FUSED_ADAGRAD_WITH_CUDA", None))
    # No -std: torch adds the standard its own headers need (C++17 in older releases, C++20 in
    # 2.13), the same one it adds for the C++ files.
    compile_args["nvcc"] = ["-O3"]

extension = Extension(
    "fused_adagrad._C",
    sources,
    include_dirs=[os.path.abspath("csrc")],
    define_macros=macros,
    extra_compile_args=compile_args,
    extra_link_args=["-fopenmp"],
)

setup(
    name="fused-adagrad",
    version=VERSION,
    description="Fused Adagrad for PyTorch: one pass per element on CPU (AVX2/AVX-512) and CUDA",
    package_dir={"": "python"},
    packages=["fused_adagrad"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
)
