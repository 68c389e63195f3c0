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
