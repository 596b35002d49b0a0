"""Notebook conventions, written once: a checker, an output stripper and a template builder.

    python -m medkit.nbtools check notebooks/*.ipynb   # exit 1 and list problems
    python -m medkit.nbtools strip notebooks/*.ipynb   # drop outputs and execution counts
    python -m medkit.nbtools new 04_qlora_phi2 "QLoRA on Phi"   # a new notebook from the template
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

# Things that stall or break a headless papermill run.
_FORBIDDEN = [
    (re.compile(r"^\s*[!%]\s*pip\b", re.M), "`!pip`/`%pip` install cell (put Colab set-up behind a check)"),
    (re.compile(r"\binput\s*\("), "`input()` waits for a person"),
    (re.compile(r"notebook_login\s*\(|huggingface_hub\.login\s*\(|\blogin\s*\(\s*\)"), "a login call"),
    (re.compile(r"sys\.path\.(append|insert)"), "`sys.path` edits (install the package instead)"),
    (re.compile(r"\bprofile\s*(==|!=)|(==|!=)\s*profile\b|\bprofile\s+(not\s+)?in\s*[\[(]"),
     "a branch on the profile's name (a profile changes configuration: put the difference in medkit.config)"),
]


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def check(path: str | Path) -> list[str]:
    """The convention problems of one notebook (empty list: it conforms)."""
    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001 - report any unreadable notebook plainly
        return [f"{path}: not a readable notebook ({exc})"]
    problems = []
    cells = nb.cells
    if not cells or cells[0].cell_type != "markdown" or not cells[0].source.lstrip().startswith("#"):
        problems.append("the first cell must be a markdown title")
    elif "learn" not in cells[0].source.lower() or "|" not in cells[0].source:
        problems.append("the opening markdown must say what you will learn and give a profile table")
    code = _code_cells(nb)
    if not code:
        return [f"{path}: has no code cells"]
    for i, cell in enumerate(code, 1):
        if cell.get("outputs"):
            problems.append(f"code cell {i} has outputs (strip them: python -m medkit.nbtools strip)")
        if cell.get("execution_count") is not None:
            problems.append(f"code cell {i} has an execution count")
        for pattern, why in _FORBIDDEN:
            if pattern.search(cell.source):
                problems.append(f"code cell {i}: {why}")
    tagged = [i for i, c in enumerate(code, 1) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        problems.append("no code cell is tagged `parameters`")
    else:
        src = code[tagged[0] - 1].source
        for name in ("profile", "seed", "output_dir"):
            if not re.search(rf"^\s*{name}\s*=", src, re.M):
                problems.append(f"the parameters cell does not set `{name}`")
    first_real = next((c for c in code if "colab" not in c.source.lower()), code[0])
    if "show_environment(" not in first_real.source:
        problems.append("the first code cell (after any Colab set-up) must print versions and "
                        "the device (medkit.notebook.show_environment())")
    if "record(" not in code[-1].source:  # markdown may follow; the last *code* cell records
        problems.append("the last code cell must record metrics (session.record(...))")
    if cells[-1].cell_type != "markdown":
        problems.append("the notebook must close with markdown (what to try next)")
    return [f"{path}: {p}" for p in problems]


def strip(path: str | Path) -> bool:
    """Remove outputs and execution counts in place; True if the file changed."""
    path = Path(path)
    before = path.read_text()
    nb = nbformat.reads(before, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("papermill", None)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        path.write_text(after)
        return True
    return False


def build(cells: list[tuple[str, str] | tuple[str, str, list[str]]], path: str | Path) -> Path:
    """Write a notebook from ``[("md"|"code", source[, tags]), ...]`` with no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for item in cells:
        kind, source = item[0], item[1]
        tags = item[2] if len(item) > 2 else []
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs quiet
        cell["id"] = f"cell-{i:02d}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbformat.writes(nb) + "\n")
    return path


# Which extras a notebook's Colab cell installs (medkit.colab): 05 needs Unsloth on a GPU, 09
# llama.cpp (and vLLM on a GPU); the others only the course itself.
COLAB_EXTRAS = {"05_r1_cot_unsloth": ["gpu"], "09_vllm_serving": ["serve", "vllm"]}


def colab_cell(extras: list[str] | tuple[str, ...] = ()) -> str:
    """The first code cell: on Colab, clone the course once and run ``medkit/colab.py``'s
    ``setup`` (keeps Colab's torch, installs ``extras``, says when to restart); nothing elsewhere."""
    return f"""# Colab only: install the course (does nothing anywhere else; safe to run twice).
import os, runpy, subprocess
if "COLAB_RELEASE_TAG" in os.environ:
    home = os.environ.get("MEDKIT_HOME", "/content/medkit")
    if not os.path.isdir(home):
        repo = os.environ.get("MEDKIT_REPO")  # your clone's git URL, see README "Colab"
        if not repo:
            raise RuntimeError("On Colab set MEDKIT_REPO to the course's git URL first (README: Colab).")
        subprocess.run(["git", "clone", "-q", repo, home], check=True)
    runpy.run_path(f"{{home}}/medkit/colab.py")["setup"](home, extras={list(extras)!r})
    os.chdir(f"{{home}}/notebooks")"""


COLAB_CELL = colab_cell()

ENV_CELL = """import medkit
from medkit import notebook
notebook.show_environment();"""


def params_cell(**extra: str) -> str:
    """The `parameters` cell: papermill injects overrides right after it."""
    lines = ['profile = "tiny"      # tiny (CPU, minutes) | colab-t4 | gpu-24gb',
             "seed = 0",
             'output_dir = ""       # empty: outputs/runs/interactive; the runner passes its run folder']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines)


def template(name: str, title: str) -> list[tuple]:
    """The cells of a new course notebook that already follows every convention."""
    return [
        ("md", f"# {name[:2]} · {title}\n\nOne paragraph: what this step does and why.\n\n"
               "**What you will learn**\n- …\n\n"
               "| profile | what runs | time | memory |\n| --- | --- | --- | --- |\n"
               "| `tiny` (2-core CPU) | … | measure it | measure it |\n"
               "| `colab-t4` | … | … | … |\n| `gpu-24gb` | … | … | … |\n"),
        ("code", COLAB_CELL),
        ("code", ENV_CELL),
        ("code", params_cell(), ["parameters"]),
        ("code", f'session = notebook.start("{name}", profile, seed, output_dir)\ncfg = session.cfg'),
        ("md", "## 1. The first step\nExplain, then call `medkit`."),
        ("code", "result = {}  # replace with medkit.<stage>.<verb>(...)"),
        ("code", 'session.record({"example.metric": len(result)})'),
        ("md", "## What to try next\n- …"),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 3 and argv[0] == "new":
        path = Path("notebooks") / f"{argv[1]}.ipynb"
        if path.exists():
            print(f"{path} exists")
            return 1
        build(template(argv[1], argv[2]), path)
        print(f"wrote {path}")
        return 0
    if len(argv) < 2 or argv[0] not in ("check", "strip"):
        print(__doc__)
        return 2
    cmd, files = argv[0], argv[1:]
    if cmd == "strip":
        for f in files:
            if strip(f):
                print(f"stripped {f}")
        return 0
    problems = [p for f in files for p in check(f)]
    print("\n".join(problems) if problems else f"{len(files)} notebook(s) follow the conventions")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
