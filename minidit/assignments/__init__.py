"""The course's graded assignments: one module per assignment, each with NAME, TITLE, CHECKS and DISABLED.

A module's CHECKS is a list of `minidit.grading.Check`; the probes name the notebook objects they need. DISABLED
lists the package's own implementations of what the student writes ('module:function' or 'module:Class.method');
they raise while a check runs (see minidit.grading). `common` holds the toys and judges several assignments share.
Solutions live in `solutions/<NAME>.ipynb`, exercises are generated into `exercises/<NAME>.ipynb`. Register a new
assignment with one entry below.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

ASSIGNMENTS: dict[str, str] = {
    "A1_tokens": "minidit.assignments.a1_tokens",
    "A2_adaln_zero": "minidit.assignments.a2_adaln_zero",
    "A3_attention": "minidit.assignments.a3_attention",
    "A4_rectified_flow": "minidit.assignments.a4_rectified_flow",
    "A5_seed_bug_hunt": "minidit.assignments.a5_seed_bug_hunt",
    "A6_vae": "minidit.assignments.a6_vae",
    "A7_ddpm": "minidit.assignments.a7_ddpm",
    "A8_joint_attention": "minidit.assignments.a8_joint_attention",
    "A9_guidance": "minidit.assignments.a9_guidance",
    "A10_reflow": "minidit.assignments.a10_reflow",
    "A11_cross_resolution": "minidit.assignments.a11_cross_resolution",
}


def get_assignment(name: str) -> ModuleType:
    """The assignment module for a full name ('A1_tokens') or its short form ('A1', 'a1')."""
    full = resolve_name(name)
    if full is None:
        raise ValueError(f"unknown assignment {name!r}; choose one of {sorted(ASSIGNMENTS)}")
    return importlib.import_module(ASSIGNMENTS[full])


def resolve_name(name: str) -> str | None:
    """'A1', 'a1_tokens' or 'A1_tokens' → 'A1_tokens'; None when nothing matches."""
    for full in ASSIGNMENTS:
        if name.lower() == full.lower():
            return full
    m = re.fullmatch(r"[Aa](\d+)", name)
    if m:
        return next((f for f in ASSIGNMENTS if f.split("_")[0] == f"A{int(m.group(1))}"), None)
    return None


def for_notebook(path: str | Path) -> str | None:
    """The assignment a notebook file is for, from its name ('A3_attention.ipynb', 'a3-mine.ipynb' → 'A3_attention')."""
    m = re.match(r"[Aa](\d+)(?!\d)", Path(path).stem)
    return resolve_name(f"A{m.group(1)}") if m else None
