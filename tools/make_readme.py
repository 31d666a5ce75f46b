"""Write README.md from nbs/index.ipynb, or check that the two agree.

nbdev_readme needs Quarto, which cannot be installed on every machine that
works on bnnorm, so this script renders the notebook with the standard
library alone: Markdown cells verbatim, code cells as Python blocks, text
outputs as plain blocks. Cells whose first line is `#| hide` are skipped.
Image links relative to nbs/ (`](images/...`) are rewritten relative to the
repository root, where README.md lives.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"


def _text(value):
    return "".join(value) if isinstance(value, list) else value


def _directives(source):
    return {line.strip() for line in source.splitlines() if line.startswith("#|")}


def _render_output(output):
    if output.get("output_type") == "stream":
        return _text(output["text"])
    data = output.get("data", {})
    if "text/markdown" in data:
        return None
    if "text/plain" in data:
        return _text(data["text/plain"]) + "\n"
    return None


def render(notebook_path=NOTEBOOK):
    """Return the README text for the notebook at `notebook_path`."""
    cells = json.loads(notebook_path.read_text(encoding="utf-8"))["cells"]
    parts = []
    for cell in cells:
        source = _text(cell["source"]).rstrip()
        if not source:
            continue
        if cell["cell_type"] == "markdown":
            parts.append(source.replace("](images/", "](nbs/images/") + "\n")
            continue
        if cell["cell_type"] != "code" or "#| hide" in _directives(source):
            continue
        code = "\n".join(line for line in source.splitlines() if not line.startswith("#|"))
        parts.append("```python\n" + code.strip() + "\n```\n")
        outputs = [_render_output(o) for o in cell.get("outputs", [])]
        printed = "".join(o for o in outputs if o)
        if printed.strip():
            parts.append("```\n" + printed.rstrip() + "\n```\n")
    return HEADER + "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if README.md differs from the notebook, writing nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = README.read_text(encoding="utf-8") if README.exists() else ""
        if current != text:
            print("README.md differs from nbs/index.ipynb: run `python tools/make_readme.py` and commit.")
            return 1
        print("README.md matches nbs/index.ipynb.")
        return 0
    README.write_text(text, encoding="utf-8")
    print(f"Wrote {README.relative_to(ROOT)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
