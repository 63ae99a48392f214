"""Where every benchmark leaves its figures: OUT/STEM.md (the table the README quotes) and
OUT/STEM.json (the raw numbers), STEM naming the benchmark and the date."""
import json
import os


def write_results(out_dir, stem, markdown, data):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    with open(base + ".md", "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    with open(base + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {base}.md and {base}.json")
