"""What the examples share for their PNGs: matplotlib when it is installed (the examples print
their numbers without it), and where and how a figure is saved."""
import pathlib

# Under /build/, which .gitignore lists, so the examples leave the checkout clean.
BUILD = pathlib.Path(__file__).resolve().parent.parent / "build"


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (and why) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot skipped: {e} (python -m pip install matplotlib, or run examples/demo.sh)")
        return None
    return plt


def save(fig, path):
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")
