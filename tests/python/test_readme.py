"""The README as a newcomer follows it: every ```python block runs as written, every ```cpp block
is a whole program that compiles as written (with the ```cmake block, against the pip install) and
runs, every shell line that runs Python says which Python, and examples/cpp's configure step finds
the packages through Python, or names the missing package fused_adagrad and the fix."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from torch_support import cuda_majors

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_TEXT = README.read_text()
FENCED_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def _cmake_cannot_use_torch():
    """Why no CMake project here can use this torch, or "" when one can: cmake is missing, or a
    CUDA torch's own CMake config needs a toolkit of its CUDA major, which this machine lacks."""
    if shutil.which("cmake") is None:
        return "cmake is not on PATH"
    torch_major, toolkit_major = cuda_majors()
    if torch_major in ("none", toolkit_major):
        return ""
    return (f"torch {torch.__version__}'s CMake config needs a CUDA {torch_major} toolkit; this "
            f"machine has {'none' if toolkit_major == 'none' else 'CUDA ' + toolkit_major}")


needs_cmake = pytest.mark.skipif(bool(_cmake_cannot_use_torch()), reason=_cmake_cannot_use_torch())
GENERATOR = ["-G", "Ninja"] if shutil.which("ninja") else []
PREFIX_PATH_CODE = ("import fused_adagrad, torch; "
                    "print(fused_adagrad.cmake_prefix_path + ';' + torch.utils.cmake_prefix_path)")
# A shell line runs an unnamed Python when `python` or `pip` starts a command in it (not a path
# such as python/fused_adagrad/).
BARE_PYTHON = re.compile(r"(?:^|\$\(|&&|\|\||;|\|)\s*(?:python3?|pip3?)(?:\s|$)")


def fenced_blocks(language):
    """(line number, code) of each README block fenced as ```language."""
    return [(README_TEXT.count("\n", 0, found.start()) + 2, found.group(2))
            for found in FENCED_BLOCK.finditer(README_TEXT) if found.group(1) == language]


def indented_blocks():
    """(line number, lines) of each 4-space indented block outside fences: shell commands,
    listings, printed output."""
    blocks, in_fence, previous = [], False, ""
    for number, line in enumerate(README_TEXT.splitlines(), start=1):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("    "):
            if blocks and blocks[-1][0] + len(blocks[-1][1]) == number:
                blocks[-1][1].append(line.strip())
            elif not previous.strip():
                blocks.append((number, [line.strip()]))
        previous = line
    return blocks


def block_ids(blocks):
    return [f"line {number}" for number, _ in blocks]


def run(command, timeout, **kwargs):
    """The finished process; stdout and stderr together in .stdout."""
    return subprocess.run([str(part) for part in command], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs)


def check_run(command, timeout, **kwargs):
    done = run(command, timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-6000:]}"
    return done.stdout


def squeezed(text):
    """CMake wraps its messages: compare with the whitespace squeezed."""
    return " ".join(text.split())


def test_readme_has_the_quickstarts():
    assert fenced_blocks("python") and fenced_blocks("cpp")
    assert len(fenced_blocks("cmake")) == 1, "one ```cmake block: the C++ quickstart's CMakeLists"


@pytest.mark.parametrize("code", [code for _, code in fenced_blocks("python")],
                         ids=block_ids(fenced_blocks("python")))
def test_python_block_runs(tmp_path, code):
    # From an empty directory, so that the import is the installed package.
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    check_run([sys.executable, script], timeout=120, cwd=tmp_path)


@needs_cmake
def test_cpp_blocks_compile_and_run(tmp_path):
    """The first ```cpp block is the source the ```cmake block names; every further one is
    added to the same project as a program of its own. One configure, one build."""
    cpp = fenced_blocks("cpp")
    for number, code in cpp:
        assert re.search(r"^int main\(", code, re.M), f"README line {number}: not a whole program"
    (_, cmake_lists), = fenced_blocks("cmake")
    target, source = re.search(r"add_executable\((\w+) ([\w.]+)\)", cmake_lists).groups()
    if "cmake_minimum_required" not in cmake_lists:  # the lines a user adds to a project
        cmake_lists = ("cmake_minimum_required(VERSION 3.18)\nproject(readme LANGUAGES CXX)\n"
                       + cmake_lists)
    project = tmp_path / "project"
    project.mkdir()
    (project / source).write_text(cpp[0][1])
    programs = [target]
    for number, code in cpp[1:]:
        name = f"readme_line_{number}"
        (project / f"{name}.cpp").write_text(code)
        cmake_lists += (f"add_executable({name} {name}.cpp)\n"
                        f"target_link_libraries({name} PRIVATE FusedAdagrad::fused_adagrad)\n")
        programs.append(name)
    (project / "CMakeLists.txt").write_text(cmake_lists)

    prefix_path = check_run([sys.executable, "-c", PREFIX_PATH_CODE], timeout=60, cwd=tmp_path)
    build = tmp_path / "build"
    check_run(["cmake", "-S", project, "-B", build, *GENERATOR,
               f"-DCMAKE_PREFIX_PATH={prefix_path.strip()}"], timeout=300, cwd=tmp_path)
    check_run(["cmake", "--build", build, "--parallel", "2"], timeout=600, cwd=tmp_path)
    for name in programs:
        check_run([build / name], timeout=120, cwd=tmp_path)


def test_shell_lines_name_their_python():
    """Every indented command line that runs `python` or `pip` comes after a
    `source .../bin/activate` line of its block; otherwise it must say .venv/bin/python."""
    unnamed = []
    for number, lines in indented_blocks():
        activated = False
        for offset, line in enumerate(lines):
            command = re.sub(r"\s+#.*$", "", line)
            if re.match(r"source \S*bin/activate$", command):
                activated = True
            elif BARE_PYTHON.search(command) and not activated:
                unnamed.append(f"README line {number + offset}: {line}")
    assert not unnamed, "runs a Python the reader may not have:\n" + "\n".join(unnamed)


def configure_examples_cpp(tmp_path, python, env):
    """Configures examples/cpp with -DPython_EXECUTABLE=python and no CMAKE_PREFIX_PATH."""
    env = {key: value for key, value in env.items() if key != "CMAKE_PREFIX_PATH"}
    return run(["cmake", "-S", ROOT / "examples" / "cpp", "-B", tmp_path / "build-example",
                *GENERATOR, f"-DPython_EXECUTABLE={python}"], timeout=300, cwd=tmp_path, env=env)


@needs_cmake
def test_examples_cpp_configure_names_the_missing_python_package(tmp_path):
    # A Python without fused_adagrad: a bare venv of this one, with nothing on PYTHONPATH.
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    check_run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], timeout=120, env=env)
    bare_python = tmp_path / "bare" / "bin" / "python"
    assert run([bare_python, "-c", "import fused_adagrad"], timeout=60, cwd=tmp_path,
               env=env).returncode != 0, f"{bare_python} imports fused_adagrad"

    configure = configure_examples_cpp(tmp_path, bare_python, env)
    assert configure.returncode != 0, "configured without fused_adagrad:\n" + configure.stdout
    message = squeezed(configure.stdout)
    for part in [f"the Python interpreter {bare_python} cannot import the Python package "
                 "fused_adagrad (ModuleNotFoundError: No module named 'fused_adagrad')",
                 "source .venv/bin/activate", "-DPython_EXECUTABLE=.venv/bin/python"]:
        assert part in message, configure.stdout


@needs_cmake
def test_examples_cpp_configures_with_the_python_that_has_the_package(tmp_path):
    # Relative, as the README's -DPython_EXECUTABLE=.venv/bin/python is.
    python = os.path.relpath(sys.executable, tmp_path)
    configure = configure_examples_cpp(tmp_path, python, os.environ)
    assert configure.returncode == 0, configure.stdout[-6000:]
    # Found through Python, not through some other install on CMake's search path.
    assert "FusedAdagrad and Torch from " in configure.stdout, configure.stdout


def heading_anchor(heading):
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped, spaces
    as hyphens ("C++ quickstart" -> "c-quickstart")."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_lead_somewhere():
    """Every link in the README and docs/ names a file of the repository and, after #, one of its
    headings."""
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in {heading_anchor(heading) for heading in re.findall(
                    r"^#+ (.*)$", FENCED_BLOCK.sub("", linked.read_text()), re.M)}:
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
