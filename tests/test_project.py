"""The project's promises about itself: two README commands, CI calls the test command, pinned environment."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def pyproject_requirements() -> set[str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    for extra in ("course", "dev"):
        reqs += [r for r in proj["optional-dependencies"][extra] if not r.startswith("minidit")]
    return {r.replace(" ", "") for r in reqs}


def environment_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return pip


def test_environment_yml_agrees_with_pyproject():
    pip = environment_pip()
    listed = {r.replace(" ", "") for r in pip if not r.startswith("-")}
    assert listed == pyproject_requirements()
    assert "-c requirements/constraints.txt" in pip and "-e ." in pip
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minor = int(py.split("=")[1].split(".")[1])
    assert minor >= 10  # pyproject: requires-python >= 3.10


def test_constraints_pin_every_dependency():
    pins = {}
    for line in (ROOT / "requirements/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for req in pyproject_requirements():
        assert _name(req) in pins, f"{req} is not pinned in requirements/constraints.txt"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    head = readme[:1500]
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert "ruff check" in makefile and "--nbval" in makefile


def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target (tab-indented lines under `target:`)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        body.append(line.strip())
    return body


def test_make_targets_call_the_one_cli():
    """One CLI: the Makefile's course commands are `minidit` subcommands (no `python -m minidit.<module>`)."""
    assert any("minidit demo" in c for c in make_recipe("demo"))
    assert any(c.endswith("minidit exercises") for c in make_recipe("exercises"))
    assert any(c.endswith("minidit notebooks notebooks solutions") for c in make_recipe("notebooks"))
    assert any("pytest" in c and "tests" in c for c in make_recipe("test"))
    makefile = (ROOT / "Makefile").read_text()
    assert "python -m minidit." not in makefile
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert proj["scripts"] == {"minidit": "minidit.cli:main"}
    assert (ROOT / "minidit" / "__main__.py").exists()  # `python -m minidit` is the same command


def test_removed_entry_points_stay_removed():
    """`python -m minidit.vae|t2i|notebooks|grading` are gone: those modules have no command-line entry of their own."""
    for module in ("vae.py", "t2i.py", "grading/notebooks.py"):
        assert "__main__" not in (ROOT / "minidit" / module).read_text(), module
    assert not (ROOT / "minidit" / "grading" / "__main__.py").exists()
