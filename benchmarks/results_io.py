"""Where every benchmark leaves its figures: OUT/STEM.md (the table the README quotes) and
OUT/STEM.json (the raw numbers), STEM naming the benchmark and the date."""
import json
import os
import platform


def write_results(out_dir, stem, markdown, data):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    with open(base + ".md", "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    with open(base + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {base}.md and {base}.json")


def cpu_model():
    """The CPU's model name, for the machine line of a table."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), platform.processor())
