"""`python -m minidit.grading grade|make-exercises|autograder …` (see minidit.grading)."""

import sys

from minidit.grading.cli import main

sys.exit(main())
