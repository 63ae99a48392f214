"""Smoke tests of examples/: each script runs as a user runs it, in a subprocess with this Python,
exits 0, prints what it promises and writes its PNG (or says why not, without matplotlib)."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# d2l section 7.5's printed results after 20 epochs: eta as printed -> (x1, x2).
D2L_PUBLISHED = {"0.4": (-2.382563, -0.158591), "2": (-0.002295, -0.000000)}
D2L_LINE = re.compile(r"^eta (\S+): epoch 20, x1 (\S+), x2 (\S+) \(d2l: (\S+), (\S+)\)$", re.M)


def run_example(name, *args, without_matplotlib=False):
    """The script's stdout; fails the test unless it exits 0."""
    script = str(EXAMPLES / name)
    if without_matplotlib:
        # None in sys.modules makes `import matplotlib` raise ImportError, as when it is missing;
        # the script's folder goes first on sys.path, as `python script` puts it.
        code = ("import os, runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
                "sys.path.insert(0, os.path.dirname(sys.argv[0])); "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
        command = [sys.executable, "-c", code, script, *args]
    else:
        command = [sys.executable, script, *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def check_plot(stdout, png):
    if HAVE_MATPLOTLIB:
        assert f"plot written to {png}" in stdout, stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "plot skipped" in stdout and not png.exists(), stdout


def check_d2l_values(stdout):
    printed = {eta: values for eta, *values in D2L_LINE.findall(stdout)}
    assert set(printed) == set(D2L_PUBLISHED), stdout
    for eta, (x1, x2, quoted_x1, quoted_x2) in printed.items():
        published = D2L_PUBLISHED[eta]
        assert float(x1) == pytest.approx(published[0], abs=1e-6), (eta, stdout)
        assert float(x2) == pytest.approx(published[1], abs=1e-6), (eta, stdout)
        assert (float(quoted_x1), float(quoted_x2)) == published, (eta, stdout)


def test_d2l_adagrad_reproduces_d2l(tmp_path):
    png = tmp_path / "d2l.png"
    stdout = run_example("d2l_adagrad.py", "--out", str(png))
    check_d2l_values(stdout)
    check_plot(stdout, png)


@pytest.mark.parametrize("name", ["d2l_adagrad.py", "adagrad_vs_rmsprop.py"])
def test_example_without_matplotlib_prints_and_exits_0(tmp_path, name):
    png = tmp_path / "plot.png"
    stdout = run_example(name, "--out", str(png), without_matplotlib=True)
    assert "plot skipped" in stdout and not png.exists(), stdout
    if name == "d2l_adagrad.py":
        check_d2l_values(stdout)
    else:
        assert "final effective step: FusedAdagrad" in stdout, stdout


def test_adagrad_vs_rmsprop_shows_the_difference(tmp_path):
    png = tmp_path / "compare.png"
    stdout = run_example("adagrad_vs_rmsprop.py", "--out", str(png))
    number = r"(-?\d+\.\d+)"
    on_f = {name: tuple(map(float, values)) for name, *values in re.findall(
        rf"^\s+(FusedAdagrad|RMSprop)\s+x \({number}, {number}\), f {number}, "
        rf"effective step {number} at step 1, {number} at step 20$", stdout, re.M)}
    on_regression = {name: tuple(map(float, values)) for name, *values in re.findall(
        rf"^\s+(FusedAdagrad|RMSprop)\s+loss {number} \({number} above least squares\), "
        rf"effective step {number} at step 1, {number} at step \d+$", stdout, re.M)}
    assert set(on_f) == set(on_regression) == {"FusedAdagrad", "RMSprop"}, stdout

    # The 2-D function: Adagrad as d2l runs it (its eta 0.4 point), stalled far from the minimum
    # at 0 as its steps shrink; RMSprop's steps do not shrink, and it gets there.
    adagrad_x1, adagrad_x2, _, adagrad_first, adagrad_last = on_f["FusedAdagrad"]
    assert (adagrad_x1, adagrad_x2) == pytest.approx(D2L_PUBLISHED["0.4"], abs=1e-6)
    assert adagrad_last < adagrad_first / 2
    rmsprop_x1, rmsprop_x2, rmsprop_f, rmsprop_first, rmsprop_last = on_f["RMSprop"]
    assert abs(rmsprop_x1) < 0.1 and abs(rmsprop_x2) < 0.1 and rmsprop_f < 1e-3
    assert rmsprop_last > rmsprop_first

    # The noisy regression: Adagrad's step keeps shrinking and it settles near the best loss;
    # RMSprop's step stays large, so it keeps jittering above it.
    _, adagrad_excess, adagrad_first, adagrad_last = on_regression["FusedAdagrad"]
    _, rmsprop_excess, rmsprop_first, rmsprop_last = on_regression["RMSprop"]
    assert adagrad_last < adagrad_first / 5
    assert rmsprop_last > rmsprop_first / 2
    assert adagrad_excess < rmsprop_excess / 5
    final = re.search(rf"^final effective step: FusedAdagrad {number}, RMSprop {number}", stdout,
                      re.M)
    assert final, stdout
    assert float(final[2]) > 10 * float(final[1]), stdout
    check_plot(stdout, png)


def test_demo_learns_and_matches_torch(tmp_path):
    """30 of the demo's 100 steps (each trains a 14.5 M-param model four ways)."""
    png = tmp_path / "demo.png"
    stdout = run_example("demo.py", "--steps", "30", "--out", str(png))
    assert re.search(r"^PASS: parameters ", stdout, re.M), stdout
    assert re.search(r"^PASS: FusedEmbeddingBags' run bitwise identical to FusedAdagrad's$",
                     stdout, re.M), stdout
    loss = re.search(r"^loss \(FusedAdagrad, mean of 10 steps\): first (\S+), last (\S+); "
                     r"noise floor (\S+)$", stdout, re.M)
    assert loss, stdout
    first, last, floor = map(float, loss.groups())
    # Learning: the loss falls well below where it started, and stays above the noise floor
    # (fresh batches every step: no model can beat the noise).
    assert floor < last < 0.8 * first, stdout
    assert re.search(r"^backward \+ optimizer step \(median of 30\): .* FusedAdagrad \d+\.\d+ ms, "
                     r"FusedEmbeddingBags \+ FusedAdagrad \d+\.\d+ ms", stdout, re.M), stdout
    check_plot(stdout, png)
