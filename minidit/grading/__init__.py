"""Exercises and autograding for the course's assignments (`minidit grade`, `make exercises`, Gradescope zips).

Instructor workflow
-------------------
1. Write the assignment as a solution notebook, `solutions/<NAME>.ipynb` (e.g. A1_tokens): instructions in
   markdown, each function to implement in its own code cell with a docstring, the student's part between
   `### BEGIN SOLUTION` and `### END SOLUTION`, and a self-check cell after it. Execute and save it with outputs:
   `minidit notebooks solutions/<NAME>.ipynb` (`make notebooks` runs every lesson and solution). The format of the
   markers, including `### BEGIN EXERCISE` for exercises that start from given code, is in
   `minidit.grading.exercises`.
   - **Hints teach, they do not answer.** A `# HINT: …` line inside the block becomes the exercise's
     `NotImplementedError` message: one sentence that points to the idea ("t has one value per sample; make it
     broadcast over the other axes of x0"), never a line of code. A fuller hint may follow the instructions in a
     collapsed markdown cell (`<details><summary>Hint</summary>…</details>`), still without the solution's lines;
     whatever code a hint shows must pass the notebook's own checks. tests/test_grading_hints.py enforces both.
   - **Self-checks agree with the grader.** Every property a check grades has a self-check (an `assert` whose
     message names the function to fix), covering every input shape and dtype the instructions promise. Self-checks
     compare with values (worked by hand, or printed by the reference and pasted) or with code written in the
     notebook from the instructions (a loop over the definition, PyTorch's own layers) — never with an import of
     the package's answer.
   - **The policy for cells that raise** (state it in each assignment's intro): the grader grades the functions the
     notebook defines whatever its other cells do, and flags a notebook whose cells raise with a 0-point entry,
     "your notebook runs from top to bottom without errors", listing each failing cell as Jupyter numbers it after
     Restart & Run All (`In [n]`) with the error and where in the student's own code it was raised. It is a visible
     warning, not a deduction: the self-check that failed almost always has a graded check that fails with it.
2. Write the checks: `minidit/assignments/<module>.py` with NAME, TITLE, CHECKS and DISABLED, registered in
   `minidit.assignments.ASSIGNMENTS` (one dict entry). A check is
       Check("patchify: values on a 2×3×8×8 batch, p = 2", points=2,
             probe=lambda patchify: patchify(randn(0, 2, 3, 8, 8), 2),          # runs in the sandbox
             expect=lambda: tokens.patchify(randn(0, 2, 3, 8, 8), 2))          # runs in the grader
   The probe's parameter names are the notebook names it needs; it returns raw outputs. The grader computes
   `expect()` itself and compares (`compare`: shapes, then values within atol/rtol, saying when the difference is
   a flipped sign, a constant factor, an offset or an order), or calls `judge(got, want)` for anything else. Feedback
   is in words a student can act on: `expect` may return an `Answer(value, mistakes={"what went wrong": value})`
   so that a result matching a known mistake is named ("the index is off by one: use ᾱ at step k itself"), and a
   judge reports shapes, dtypes and call counts as such ("t must have one value per sample: expected shape (3,),
   got (1,)"). Optional: timeout (s, default 10), visibility (Gradescope's), atol, rtol.
   DISABLED lists the package's own implementations of what the student writes, as 'module:function' or
   'module:Class.method' (a class: all its methods). While a check runs, each of them raises, whatever name or
   alias the notebook calls it by (its code object is replaced in the check's process), so `return
   ref.interpolate(x0, noise, t)`, `from minidit.flow import interpolate as f`, a subclass of the package's class
   or a function built on the package's code object score 0 on that check. Probes must therefore not call them in
   the sandbox (compute reference weights or inputs another way, or in `expect`).
3. `make exercises` (= `minidit exercises`) regenerates `exercises/` from `solutions/`;
   tests/test_notebooks_policy.py fails while `exercises/` is stale. Give students `exercises/<NAME>.ipynb`.
4. Grade: `minidit grade submission.ipynb [--assignment A1_tokens] [--json results.json] [--tests DIR]
   [--timeout S]` prints a score table and writes Gradescope's results.json
   (`score`, `execution_time`, `output`, `tests[]` with `name`, `score`, `max_score`, `status`, `output`,
   `visibility`; the first entry is the 0-point warning above). tests/test_grading*.py check that every solution
   gets full marks, every untouched exercise 0 on every check, known-wrong implementations lose points with
   feedback that names the mistake (and fail a self-check too), and a thin wrapper around the package scores 0.
5. Gradescope: `minidit autograder A1_tokens [--tests DIR] [--out zip]` writes a zip with `setup.sh` (installs
   minidit with the pins of requirements/constraints.txt, CPU torch) and `run_autograder` (runs
   `python3 -m minidit grade /autograder/submission --assignment A1_tokens
   --json /autograder/results/results.json`). Upload it as the assignment's autograder (Ubuntu base image).

Hidden checks (`--tests DIR`): instructor files kept outside the repository, `DIR/*.py`, each a module with
    from minidit.grading import Check, randn
    ASSIGNMENT = "A1_tokens"       # optional: these checks apply only to this assignment
    DISABLED = []                  # optional: more package functions to switch off while checks run
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
installation. Cells run in an IPython shell, in order, continuing past errors, each with the execution count it
would have after Restart & Run All; a cell that outlives the notebook time limit, or that kills the process
(`os._exit`), is skipped and the notebook is re-run without it. Each check runs in its own child forked from the
executed sandbox, with its own timeout and the DISABLED functions switched off; a check that hangs, crashes or
exits fails alone. Errors are reported with the student's own frames only (`In [n], line L, in f`), never the
grader's or torch's. Output is drained and discarded (a submission may print gigabytes). The grader reads only
JSON from the sandbox, computes every reference answer itself, ignores whatever a submission does to torch, the
checks or the grader inside its own process, kills the sandbox's processes (including daemons that escaped with
setsid, re-parented to the zygote) and then writes results.json atomically. Limits: a submission that retypes or
`exec`s a copy of the package's source is not detected (that is plagiarism, for a similarity check, not
delegation), and when the grader does not run as root a submission could signal the grader's processes, since they
share a user. On Gradescope the grader runs as root and the submission does not.
"""

from minidit.grading.checks import Answer, Check, compare, expects_error, raised, randn, randomize_
from minidit.grading.exercises import make_exercise, make_exercises
from minidit.grading.grader import Grader, GradingError, format_table, grade_notebook, write_results

__all__ = ["Answer", "Check", "Grader", "GradingError", "compare", "expects_error", "format_table", "grade_notebook",
           "make_exercise", "make_exercises", "raised", "randn", "randomize_", "write_results"]
