"""A Gradescope autograder zip for one assignment: setup.sh, run_autograder, the package and its pins.

Gradescope unpacks the zip into /autograder/source, runs setup.sh once (as root) when it builds the image, and
runs run_autograder for every submission with the submission in /autograder/submission; it reads
/autograder/results/results.json. `AUTOGRADER_ROOT` (default /autograder) lets you try the zip locally.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from minidit.assignments import resolve_name

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image.
set -euxo pipefail
cd "$(dirname "$0")"
python3 -m pip install --upgrade pip
# CPU wheels of the pinned torch/torchvision (the grader never uses a GPU)
python3 -m pip install --index-url https://download.pytorch.org/whl/cpu {torch_pins}
# the package with its dependencies (what `python3 -m minidit` imports) and IPython, which runs the submission's cells
python3 -m pip install -c requirements/constraints.txt ./minidit-src ipython
python3 -c "import minidit.cli, IPython, torch; print('minidit grader ready, torch', torch.__version__)"
python3 -m minidit grade --help > /dev/null
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission.
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
mkdir -p "$ROOT/results"
exec python3 -m minidit grade "$ROOT/submission" --assignment {assignment} \\
    --json "$ROOT/results/results.json" --timeout {timeout}{tests}
"""

PACKAGE_FILES = ("pyproject.toml", "README.md")


def _pins(constraints: Path, names: tuple[str, ...]) -> str:
    pins = {}
    for line in constraints.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    missing = [n for n in names if n not in pins]
    if missing:
        raise ValueError(f"{constraints} does not pin {missing}")
    return " ".join(f"{n}=={pins[n]}" for n in names)


def build_autograder(assignment: str, out: str | Path, repo: str | Path = ".", tests_dir: str | Path | None = None,
                     timeout: float = 600) -> Path:
    """Write the autograder zip for `assignment` (hidden checks from `tests_dir/*.py` go in as hidden_tests/)."""
    name = resolve_name(assignment)
    if name is None:
        raise ValueError(f"unknown assignment {assignment!r}")
    repo = Path(repo)
    constraints = repo / "requirements" / "constraints.txt"
    pkg = repo / "minidit"
    if not constraints.is_file() or not pkg.is_dir():
        raise ValueError(f"{repo.resolve()} is not the minidit repository "
                         "(it needs minidit/ and requirements/constraints.txt)")
    tests = sorted(Path(tests_dir).glob("*.py")) if tests_dir else []
    if tests_dir and not tests:
        raise ValueError(f"no *.py hidden tests in {tests_dir}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        def add_text(arcname: str, text: str, executable: bool = False) -> None:
            info = zipfile.ZipInfo(arcname, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if executable else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)

        add_text("setup.sh", SETUP_SH.format(torch_pins=_pins(constraints, ("torch", "torchvision"))), True)
        add_text("run_autograder", RUN_AUTOGRADER.format(
            assignment=name, timeout=f"{timeout:g}",
            tests=' --tests "$ROOT/source/hidden_tests"' if tests else ""), True)
        add_text("requirements/constraints.txt", constraints.read_text())
        for f in PACKAGE_FILES:
            add_text(f"minidit-src/{f}", (repo / f).read_text())
        add_text("minidit-src/requirements/constraints.txt", constraints.read_text())
        for f in sorted(pkg.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".json", ".safetensors", ".typed"):
                z.write(f, f"minidit-src/{f.relative_to(repo).as_posix()}")
        for f in tests:
            add_text(f"hidden_tests/{f.name}", f.read_text())
    return out
