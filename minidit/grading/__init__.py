"""Exercises and autograding for the course's assignments (`minidit grade`, `make exercises`, Gradescope zips).

Instructor workflow
-------------------
1. Write the assignment as a solution notebook, `solutions/<NAME>.ipynb` (e.g. A1_tokens): instructions in
   markdown, each function to implement in its own code cell with a docstring, the student's part between
   `### BEGIN SOLUTION` and `### END SOLUTION` (a `# HINT: …` line inside becomes the exercise's error message),
   and a small self-check cell after it. Execute and save it with outputs: `minidit notebooks solutions/<NAME>.ipynb`
   (`make notebooks` runs every lesson and solution). The format of the markers, including
   `### BEGIN EXERCISE` for exercises that start from given code, is in `minidit.grading.exercises`.
2. Write the checks: `minidit/assignments/<module>.py` with NAME, TITLE and CHECKS, registered in
   `minidit.assignments.ASSIGNMENTS`. A check is
       Check("patchify: values on a 2×3×8×8 batch, p = 2", points=2,
             probe=lambda patchify: patchify(randn(0, 2, 3, 8, 8), 2),          # runs in the sandbox
             expect=lambda: tokens.patchify(randn(0, 2, 3, 8, 8), 2))          # runs in the grader
   The probe's parameter names are the notebook names it needs; it returns raw outputs. The grader computes
   `expect()` itself and compares (`compare`: shapes, then values within atol/rtol), or calls `judge(got, want)`
   for anything else. Optional: timeout (s, default 10), visibility (Gradescope's), atol, rtol.
3. `make exercises` (= `minidit exercises`) regenerates `exercises/` from `solutions/`;
   tests/test_notebooks_policy.py fails while `exercises/` is stale. Give students `exercises/<NAME>.ipynb`.
4. Grade: `minidit grade submission.ipynb [--assignment A1_tokens] [--json results.json] [--tests DIR]
   [--timeout S]` prints a score table and writes Gradescope's results.json
   (`score`, `execution_time`, `output`, `tests[]` with `name`, `score`, `max_score`, `status`, `output`,
   `visibility`). tests/test_grading.py checks that every solution gets full marks, every untouched exercise
   0 on every check, and known-wrong implementations lose points.
5. Gradescope: `minidit autograder A1_tokens [--tests DIR] [--out zip]` writes a zip with `setup.sh` (installs
   minidit with the pins of requirements/constraints.txt, CPU torch) and `run_autograder` (runs
   `python3 -m minidit grade /autograder/submission --assignment A1_tokens
   --json /autograder/results/results.json`). Upload it as the assignment's autograder (Ubuntu base image).

Hidden checks (`--tests DIR`): instructor files kept outside the repository, `DIR/*.py`, each a module with
    from minidit.grading import Check, randn
    ASSIGNMENT = "A1_tokens"       # optional: these checks apply only to this assignment
    CHECKS = [Check("hidden: patchify of a 1×1×4×4 ramp", points=1, visibility="after_published",
                    probe=lambda patchify: patchify(torch.arange(16.).reshape(1, 1, 4, 4), 2),
                    expect=lambda: torch.tensor([[[0., 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]))]
They are added after the assignment's own checks. The grader runs the file's source in the sandbox too (for the
probes), so hide reference answers in `expect`, not in module-level data the probe could read.

How a submission is run
-----------------------
Student code runs only in sandbox processes (`minidit.grading.sandbox`): forked from a zygote that imported
torch once, in their own session, with an address-space limit (`--memory-mb` on top of what torch maps), a file
size limit, one CPU thread, and as `nobody` when the grader runs as root and `nobody` can read the Python
installation. Cells run in an IPython shell, in order, continuing past errors; a cell that outlives the
notebook time limit, or that kills the process (`os._exit`), is skipped and the notebook is re-run without it.
Each check runs in its own child forked from the executed sandbox, with its own timeout; a check that hangs,
crashes or exits fails alone. Output is drained and discarded (a submission may print gigabytes). The grader
reads only JSON from the sandbox, computes every reference answer itself, ignores whatever a submission does to
torch, the checks or the grader inside its own process, kills the sandbox's processes (including daemons that
escaped with setsid, re-parented to the zygote) and then writes results.json atomically. Limits: a submission
can still copy the package's reference implementation (the checks refuse names imported from a module, but not
a wrapper around one), and when the grader does not run as root a submission could signal the grader's
processes, since they share a user. On Gradescope the grader runs as root and the submission does not.
"""

from minidit.grading.checks import Check, compare, expects_error, raised, randn, randomize_
from minidit.grading.exercises import make_exercise, make_exercises
from minidit.grading.grader import Grader, GradingError, format_table, grade_notebook, write_results

__all__ = ["Check", "Grader", "GradingError", "compare", "expects_error", "format_table", "grade_notebook",
           "make_exercise", "make_exercises", "raised", "randn", "randomize_", "write_results"]
