"""Builds fused-adagrad against the torch already installed: pip install --no-build-isolation .

Two native files go into the package: lib/libfused_adagrad.so, the C++ library (optimizers,
kernels, op registrations), which a C++ program can link without Python, and _C, the pybind11
module (csrc/bindings.cpp only), which links that library. Next to them go the headers and the
CMake package config, so that the pip install alone serves C++ users too (see
fused_adagrad.cmake_prefix_path). Metadata is in pyproject.toml; the version, flags and CUDA
architectures come from csrc/fused_adagrad/fused_adagrad.h and build_settings.env.

FUSED_ADAGRAD_CUDA picks the CUDA kernels in cuda/: auto (default: when torch has CUDA and a
toolkit of the same CUDA major version is found; otherwise a CPU build, saying why), 1 (fail if
they cannot be built) or 0 (never). FUSED_ADAGRAD_REQUIRE_CUDA=1 means 1. TORCH_CUDA_ARCH_LIST
picks the GPUs (default in build_settings.env). The toolkit is found without help where it can
be (find_cuda_toolkit); CUDA_HOME names it outright.

The version gets a local part naming the torch it was built for (0.1.0+torch2.13cpu,
0.1.0+torch2.14cu130): the native code works with that torch minor version only."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import tempfile

import setuptools
import torch
from setuptools import setup

if int(setuptools.__version__.split(".")[0]) < 61:
    # pyproject.toml's [project] table, where the name and dependencies are, needs 61.
    raise SystemExit(f"fused-adagrad's build needs setuptools >= 61 (this environment has "
                     f"{setuptools.__version__}): pip install -U 'setuptools>=61'")

VERSION = re.search(r'#define FUSED_ADAGRAD_VERSION "([^"]+)"',
                    open("csrc/fused_adagrad/fused_adagrad.h").read()).group(1)
SETTINGS = dict(re.findall(r'^([A-Z_]+)="([^"]*)"$',
                           open("build_settings.env").read(), re.M))
CXX_FLAGS = shlex.split(SETTINGS["CXX_FLAGS"])
OPENMP_FLAGS = shlex.split(SETTINGS["OPENMP_FLAGS"])
SITE_PACKAGES = os.path.dirname(os.path.dirname(torch.__file__))


def cuda_mode() -> str:
    """FUSED_ADAGRAD_CUDA, as CMake's FUSED_ADAGRAD_WITH_CUDA (AUTO, ON, OFF)."""
    mode = "1" if os.environ.get("FUSED_ADAGRAD_REQUIRE_CUDA") == "1" else \
        os.environ.get("FUSED_ADAGRAD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FUSED_ADAGRAD_CUDA={mode}: use auto, 0 or 1")
    return mode


def is_toolkit(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def nvcc_toolkit(nvcc: str) -> str:
    """The toolkit an nvcc belongs to, also when it is a symlink or a wrapper script: nvcc's dry
    run names the folder of the real binary (#$ _HERE_=/usr/local/cuda-13.0/bin)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_toolkit(root):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:
            run = subprocess.run([nvcc, "--dryrun", "-c", source, "-o", source + ".o"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return root
    here = re.search(r"^#\$ _HERE_=(.+)$", run.stdout + run.stderr, re.M)
    return os.path.dirname(here.group(1).strip()) if here else root


def find_cuda_toolkit():
    """(root, None) for the first CUDA toolkit found (bin/nvcc beside include/cuda_runtime.h),
    else (None, where it looked). A set CUDA_HOME or CUDA_PATH is the only place looked at."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            root = os.environ[name]
            return (root, None) if is_toolkit(root) else \
                (None, f"{name}={root} has no bin/nvcc with include/cuda_runtime.h")
    tried = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = nvcc_toolkit(nvcc)
        if is_toolkit(root):
            return root, None
        tried.append(f"nvcc on PATH ({nvcc}, in {root})")
    else:
        tried.append("nvcc on PATH (none)")
    # The usual install folders, then the compiler wheels (nvidia-cuda-nvcc) in site-packages.
    guesses = ["/usr/local/cuda", f"/usr/local/cuda-{torch.version.cuda}", "/opt/cuda"] + \
        sorted(glob.glob(os.path.join(SITE_PACKAGES, "nvidia", "cu[0-9]*"))) + \
        [os.path.join(SITE_PACKAGES, "nvidia", "cuda_nvcc")]
    for root in guesses:
        if is_toolkit(root):
            return root, None
    tried.append(", ".join(guesses))
    return None, ("looked for bin/nvcc beside include/cuda_runtime.h in " + "; ".join(tried) +
                  "; set CUDA_HOME to the toolkit")


def nvcc_release(root: str) -> str:
    out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


def cuda_toolkit_for_build(mode: str):
    """(toolkit root, None) when the CUDA kernels can be built, else (None, why not)."""
    if mode == "0":
        return None, None
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} was built without CUDA"
    root, why_not = find_cuda_toolkit()
    if root is None:
        return None, f"no CUDA toolkit found: {why_not}"
    release = nvcc_release(root)
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's extension builder refuses another CUDA major version than its own.
        return None, (f"nvcc {release} ({root}) and torch's CUDA {torch.version.cuda} differ in "
                      f"major version; set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit")
    return root, None


def find_cudart(root: str):
    """Where to link the CUDA runtime from: (None, folder) for the toolkit's libcudart.so, or
    (file, None) for the one torch's CUDA runtime wheel ships (torch loads that one anyway), or
    (None, None)."""
    for folder in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(root, folder, "libcudart.so")):
            return None, os.path.join(root, folder)
    wheels = glob.glob(os.path.join(SITE_PACKAGES, "nvidia", "cu[0-9]*", "lib", "libcudart.so.*")) + \
        glob.glob(os.path.join(SITE_PACKAGES, "nvidia", "cuda_runtime", "lib", "libcudart.so.*"))
    return (sorted(wheels)[-1], None) if wheels else (None, None)


CUDA_MODE = cuda_mode()
CUDA_ROOT, WHY_NOT_CUDA = cuda_toolkit_for_build(CUDA_MODE)
if CUDA_MODE == "1" and CUDA_ROOT is None:
    # On a GPU machine, a silent CPU-only build would let the CUDA tests skip instead of run.
    raise SystemExit("FUSED_ADAGRAD_CUDA=1 (or FUSED_ADAGRAD_REQUIRE_CUDA=1) but the CUDA kernels "
                     f"cannot be built: {WHY_NOT_CUDA}")
WITH_CUDA = CUDA_ROOT is not None
print(f"fused-adagrad {VERSION}: CUDA kernels " + (f"on ({CUDA_ROOT})" if WITH_CUDA else "off") +
      f" (FUSED_ADAGRAD_CUDA={CUDA_MODE}" + (f": {WHY_NOT_CUDA}" if WHY_NOT_CUDA else "") + ")")
if WITH_CUDA:
    # torch's extension builder fixes its CUDA_HOME when imported: give it the toolkit found.
    os.environ["CUDA_HOME"] = CUDA_ROOT
from torch.utils.cpp_extension import CppExtension, CUDAExtension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension as TorchBuildExtension  # noqa: E402

# The native code works with one torch minor version (and, with CUDA, that torch's CUDA major).
TORCH_MAJOR_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])
FULL_VERSION = f"{VERSION}+torch{TORCH_MAJOR_MINOR}" + \
    (f"cu{torch.version.cuda.replace('.', '')}" if WITH_CUDA else "cpu")

# Read by the package's import check when the native module fails to load.
with open("python/fused_adagrad/_version.py", "w") as f:
    f.write(f'# Written by setup.py.\n__version__ = "{FULL_VERSION}"\n'
            f'built_with_torch = "{torch.__version__}"\n'
            f'cuda_not_built_because = {WHY_NOT_CUDA or ""!r}\n')

# The library: every source but the Python bindings. It holds the op registrations (static
# initializers), so that they run once per process whoever loads it, Python or a C++ program.
lib_sources = [s for s in sorted(glob.glob("csrc/**/*.cpp", recursive=True)) if s != "csrc/bindings.cpp"]
lib_macros = [("FUSED_ADAGRAD_BUILDING_LIBRARY", None)]
lib_compile_args = {"cxx": CXX_FLAGS + OPENMP_FLAGS}
LibraryExtension = CppExtension
if WITH_CUDA:
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", SETTINGS["CUDA_ARCH_LIST"])
    LibraryExtension = CUDAExtension
    lib_sources += sorted(glob.glob("cuda/*.cu"))
    lib_macros.append(("FUSED_ADAGRAD_WITH_CUDA", None))
    # For build_info() (csrc/ops.cpp): commas, not ; or spaces, make bare tokens that no shell
    # or ninja file splits. C++ only: nvcc would read the commas as separating definitions.
    lib_compile_args["cxx"].append("-DFUSED_ADAGRAD_CUDA_ARCHS=" + ",".join(archs.replace(";", " ").split()))
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
if WITH_CUDA:
    cudart_file, cudart_dir = find_cudart(CUDA_ROOT)
    if cudart_file:  # a toolkit without one (nvcc from a wheel): link the runtime wheel's by path
        library.libraries.remove("cudart")
        library.extra_link_args.append(cudart_file)
    elif cudart_dir is None:
        raise SystemExit(f"the CUDA toolkit at {CUDA_ROOT} has no lib64/libcudart.so and torch's "
                         "CUDA runtime wheel none either: set CUDA_HOME to a full toolkit, or "
                         "FUSED_ADAGRAD_CUDA=0 for a CPU-only build")
    elif cudart_dir != os.path.join(CUDA_ROOT, "lib64"):
        library.library_dirs.append(cudart_dir)

native = CppExtension(
    "fused_adagrad._C",
    ["csrc/bindings.cpp"],
    include_dirs=[os.path.abspath("csrc")],
    libraries=["fused_adagrad"],  # library_dirs: added at build time, where the library lands
    extra_compile_args={"cxx": CXX_FLAGS},
    extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
)


def shared_cxx_runtime(linker: str):
    """The path of the process's shared libstdc++ when `linker` would link the static one (a
    toolchain built without the shared library, as one GPU machine's /opt/gcc was): a second
    C++ runtime inside our library, beside the shared one torch uses, crashed the process at the
    first error message it formatted. Linked by path, the library records libstdc++.so.6 as a
    dependency like torch's own. None where the linker finds the shared one itself."""
    if not os.path.exists("/proc/self/maps"):
        return None  # not Linux
    try:
        found = subprocess.run([linker, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if os.path.isabs(found) and os.path.exists(found):
        return None
    with open("/proc/self/maps") as maps:  # torch, imported above, has loaded it
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libstdc++.so"):
                return path
    raise SystemExit(f"{linker} links only a static libstdc++, and this process (with torch "
                     "loaded) has no shared one to link instead; build with a compiler that has "
                     "the shared library (CXX=...)")


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

    def build_extensions(self):
        runtime = shared_cxx_runtime(self.compiler.linker_so[0])
        if runtime:
            print(f"fused-adagrad: {self.compiler.linker_so[0]} has no shared libstdc++; "
                  f"linking {runtime}, torch's")
            for ext in self.extensions:
                ext.extra_link_args.append(runtime)
        super().build_extensions()

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
            "FUSED_ADAGRAD_CUDA_TOOLKIT": CUDA_ROOT or "",
            "FUSED_ADAGRAD_CONFIG_TO_LIBDIR": "../../../lib",
            "FUSED_ADAGRAD_CONFIG_TO_INCLUDEDIR": "../../../include",
        }
        configure("FusedAdagradConfig.cmake.in", os.path.join(config_dir, "FusedAdagradConfig.cmake"), values)
        configure("FusedAdagradConfigVersion.cmake.in",
                  os.path.join(config_dir, "FusedAdagradConfigVersion.cmake"), values)


# The SPDX license expression has its own keyword from setuptools 77 (PEP 639); the older
# setuptools of an older torch's environment takes the same text as a plain license.
if int(setuptools.__version__.split(".")[0]) >= 77:
    LICENSE = {"license_expression": "BSD-3-Clause"}
else:
    LICENSE = {"license": "BSD-3-Clause"}

setup(
    # One build folder per torch (and CUDA or not): switching between venvs of several torch
    # versions rebuilds only what changed, never mixes objects built against another torch.
    options={"build": {"build_base": os.path.join("build", FULL_VERSION.split("+")[1])}},
    version=FULL_VERSION,
    license_files=["LICENSE"],
    **LICENSE,
    ext_modules=[library, native],
    cmdclass={"build_ext": BuildExtension},
)
