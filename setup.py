"""Builds fused-adagrad against the torch already installed: pip install --no-build-isolation .

Two native files go into the package: lib/libfused_adagrad.so, the C++ library (optimizers,
kernels, op registrations), which a C++ program can link without Python, and _C, the pybind11
module (csrc/bindings.cpp only), which links that library. Next to them go the headers and the
CMake package config, so that the pip install alone serves C++ users too (see
fused_adagrad.cmake_prefix_path). Metadata is in pyproject.toml; the version, flags and CUDA
architectures come from csrc/fused_adagrad/fused_adagrad.h and build_settings.env.

FUSED_ADAGRAD_CUDA picks the CUDA kernels in cuda/: auto (default; when torch has CUDA and nvcc
is found), 1 (fail if they cannot be built) or 0 (never). FUSED_ADAGRAD_REQUIRE_CUDA=1 means 1.
TORCH_CUDA_ARCH_LIST picks the GPUs (default in build_settings.env)."""
import glob
import os
import re
import shlex
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
from torch.utils.cpp_extension import BuildExtension as TorchBuildExtension

VERSION = re.search(r'#define FUSED_ADAGRAD_VERSION "([^"]+)"',
                    open("csrc/fused_adagrad/fused_adagrad.h").read()).group(1)
SETTINGS = dict(re.findall(r'^([A-Z_]+)="([^"]*)"$',
                           open("build_settings.env").read(), re.M))
CXX_FLAGS = shlex.split(SETTINGS["CXX_FLAGS"])
OPENMP_FLAGS = shlex.split(SETTINGS["OPENMP_FLAGS"])

# Read by the package's import check when the native module fails to load.
with open("python/fused_adagrad/_version.py", "w") as f:
    f.write(f'# Written by setup.py.\n__version__ = "{VERSION}"\nbuilt_with_torch = "{torch.__version__}"\n')


def cuda_wanted() -> bool:
    """FUSED_ADAGRAD_CUDA, as CMake's FUSED_ADAGRAD_WITH_CUDA (AUTO, ON, OFF)."""
    mode = "1" if os.environ.get("FUSED_ADAGRAD_REQUIRE_CUDA") == "1" else \
        os.environ.get("FUSED_ADAGRAD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FUSED_ADAGRAD_CUDA={mode}: use auto, 0 or 1")
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} was built without CUDA"
    elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        why_not = f"nvcc not found (CUDA_HOME {CUDA_HOME}): set CUDA_HOME or put nvcc on PATH"
    else:
        why_not = None
    if mode == "1" and why_not:
        # On a GPU machine, a silent CPU-only build would let the CUDA tests skip instead of run.
        raise SystemExit("FUSED_ADAGRAD_CUDA=1 (or FUSED_ADAGRAD_REQUIRE_CUDA=1) but the CUDA "
                         f"kernels cannot be built: {why_not}")
    build = mode != "0" and not why_not
    print(f"fused-adagrad {VERSION}: CUDA kernels {'on' if build else 'off'} "
          f"(FUSED_ADAGRAD_CUDA={mode}{'' if build or mode == '0' else ': ' + why_not})")
    return build


WITH_CUDA = cuda_wanted()

# The library: every source but the Python bindings. It holds the op registrations (static
# initializers), so that they run once per process whoever loads it, Python or a C++ program.
lib_sources = [s for s in sorted(glob.glob("csrc/**/*.cpp", recursive=True)) if s != "csrc/bindings.cpp"]
lib_macros = [("FUSED_ADAGRAD_BUILDING_LIBRARY", None)]
lib_compile_args = {"cxx": CXX_FLAGS + OPENMP_FLAGS}
LibraryExtension = CppExtension
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", SETTINGS["CUDA_ARCH_LIST"])
    LibraryExtension = CUDAExtension
    lib_sources += sorted(glob.glob("cuda/*.cu"))
    lib_macros.append(("FUSED_ADAGRAD_WITH_CUDA", None))
    # No -std: torch adds the standard its own headers need (C++17 in older releases, C++20 in
    # 2.13), the same one it adds for the C++ files.
    lib_compile_args["nvcc"] = shlex.split(SETTINGS["NVCC_FLAGS"])
library = LibraryExtension(
    "fused_adagrad.lib.libfused_adagrad",
    lib_sources,
    include_dirs=[os.path.abspath("csrc")],
    define_macros=lib_macros,
    extra_compile_args=lib_compile_args,
    # The soname makes programs that link it record "libfused_adagrad.so", not its build path.
    # The rpath finds torch's libraries beside it in site-packages, for programs that have not
    # loaded them already (as a Python process has, and a CMake build's RPATH does).
    extra_link_args=OPENMP_FLAGS + ["-Wl,-soname,libfused_adagrad.so", "-Wl,-rpath,$ORIGIN/../../torch/lib"],
)
# A library for C++ programs must not need libpython's symbols, which libtorch_python does.
library.libraries = [name for name in library.libraries if name != "torch_python"]

native = CppExtension(
    "fused_adagrad._C",
    ["csrc/bindings.cpp"],
    include_dirs=[os.path.abspath("csrc")],
    libraries=["fused_adagrad"],  # library_dirs: added at build time, where the library lands
    extra_compile_args={"cxx": CXX_FLAGS},
    extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
)


def configure(template: str, out: str, values: dict) -> None:
    """Writes cmake/<template> with each @NAME@ replaced, as CMake's configure_file(@ONLY) does."""
    with open(os.path.join("cmake", template)) as f:
        text = re.sub(r"@(\w+)@", lambda m: values[m.group(1)], f.read())
    with open(out, "w") as f:
        f.write(text)


class BuildExtension(TorchBuildExtension):
    def finalize_options(self):
        super().finalize_options()
        self.parallel = None  # _C links the library: build them in order

    def get_ext_filename(self, fullname):
        # The library is a plain shared library, named like one, not like a Python module.
        name = super().get_ext_filename(fullname)
        if fullname.split(".")[-1] == "libfused_adagrad":
            name = os.path.join(os.path.dirname(name), "libfused_adagrad.so")
        return name

    def build_extension(self, ext):
        if ext is native:
            ext.library_dirs.append(os.path.dirname(self.get_ext_fullpath(library.name)))
        super().build_extension(ext)

    def run(self):
        if self.inplace:  # setuptools copies the library there, into a folder it does not create
            os.makedirs(os.path.dirname(self.get_ext_fullpath(library.name)), exist_ok=True)
        super().run()
        # The C++ package beside the library, laid out like torch's: include/, lib/ and
        # share/cmake/FusedAdagrad/ (what fused_adagrad.cmake_prefix_path points at).
        package = os.path.dirname(self.get_ext_fullpath(native.name))
        include = os.path.join(package, "include", "fused_adagrad")
        os.makedirs(include, exist_ok=True)
        for header in glob.glob("csrc/fused_adagrad/*.h"):
            shutil.copy(header, include)
        config_dir = os.path.join(package, "share", "cmake", "FusedAdagrad")
        os.makedirs(config_dir, exist_ok=True)
        values = {
            "FUSED_ADAGRAD_VERSION": VERSION,
            "FUSED_ADAGRAD_TORCH_VERSION": torch.__version__,
            "FUSED_ADAGRAD_BUILT_WITH_CUDA": "ON" if WITH_CUDA else "OFF",
            "FUSED_ADAGRAD_CONFIG_TO_LIBDIR": "../../../lib",
            "FUSED_ADAGRAD_CONFIG_TO_INCLUDEDIR": "../../../include",
        }
        configure("FusedAdagradConfig.cmake.in", os.path.join(config_dir, "FusedAdagradConfig.cmake"), values)
        configure("FusedAdagradConfigVersion.cmake.in",
                  os.path.join(config_dir, "FusedAdagradConfigVersion.cmake"), values)


setup(
    version=VERSION,
    ext_modules=[library, native],
    cmdclass={"build_ext": BuildExtension},
)
