"""The grading commands of the `minidit` command line: `minidit grade|exercises|autograder`."""

from __future__ import annotations

import argparse
import sys

from minidit.assignments import resolve_name
from minidit.grading.autograder import build_autograder
from minidit.grading.exercises import make_exercises
from minidit.grading.grader import GradingError, format_table, grade_notebook, write_results


def add_grade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("notebook", help="the submitted .ipynb (or a folder holding exactly one)")
    p.add_argument("--assignment", help="e.g. A1_tokens or A1 (default: from the notebook's file name)")
    p.add_argument("--json", dest="json_path", metavar="RESULTS_JSON", help="write Gradescope's results.json here")
    p.add_argument("--tests", dest="tests_dir", metavar="DIR", help="extra (hidden) checks: DIR/*.py with CHECKS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to execute the notebook (default 300)")
    p.add_argument("--check-timeout", type=float, default=None, help="cap every check's own timeout (seconds)")
    p.add_argument("--memory-mb", type=int, default=2048, help="memory for the submission's process (default 2048)")


def cmd_grade(args) -> int:
    try:
        results = grade_notebook(args.notebook, args.assignment, args.tests_dir, args.timeout, args.check_timeout,
                                 args.memory_mb, args.json_path)
    except GradingError as e:
        if args.json_path:  # Gradescope shows the student a result even when the autograder is misconfigured
            write_results({"score": 0.0, "output": f"The autograder could not grade this submission: {e}",
                           "tests": []}, args.json_path)
        print(f"minidit grade: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


def add_exercises_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solutions", default="solutions", help="solution notebooks (default: solutions)")
    p.add_argument("--out", default="exercises", help="where the exercises go (default: exercises)")
    p.add_argument("--check", action="store_true", help="only report stale exercises (exit status 1 if any)")


def cmd_exercises(args) -> int:
    changed = make_exercises(args.solutions, args.out, check=args.check)
    for path in changed:
        print(("stale: " if args.check else "wrote: ") + path)
    if args.check and changed:
        print("run `make exercises` (minidit exercises) to regenerate them", file=sys.stderr)
        return 1
    return 0


def add_autograder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("assignment", help="e.g. A1_tokens or A1")
    p.add_argument("--out", help="the zip to write (default: dist/<assignment>_autograder.zip)")
    p.add_argument("--tests", dest="tests_dir", metavar="DIR", help="hidden checks to ship (DIR/*.py)")
    p.add_argument("--repo", default=".", help="the minidit repository (default: .)")
    p.add_argument("--timeout", type=float, default=600.0, help="notebook time limit on Gradescope (seconds)")


def cmd_autograder(args) -> int:
    name = resolve_name(args.assignment)
    out = args.out or f"dist/{name or args.assignment}_autograder.zip"
    path = build_autograder(args.assignment, out, args.repo, args.tests_dir, args.timeout)
    print(f"wrote {path}: upload it as the autograder of {name} on Gradescope")
    return 0


def add_commands(sub) -> None:
    """Register `grade`, `exercises` and `autograder` on the `minidit` command's subparsers.

    `minidit`'s main prints the package's errors (ExerciseError and build_autograder's are ValueErrors) as one line
    `minidit CMD: error: …` with exit status 2; `grade` reports its own, to write results.json first.
    """
    commands = [
        ("grade", "grade a submitted assignment notebook (score table, Gradescope results.json)",
         add_grade_arguments, cmd_grade),
        ("exercises", "regenerate exercises/ from solutions/ (same as `make exercises`)",
         add_exercises_arguments, cmd_exercises),
        ("autograder", "write a Gradescope autograder zip for an assignment", add_autograder_arguments, cmd_autograder),
    ]
    for name, help_text, add_arguments, run in commands:
        sp = sub.add_parser(name, help=help_text)
        add_arguments(sp)
        sp.set_defaults(func=run)
