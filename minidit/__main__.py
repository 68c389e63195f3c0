"""`python -m minidit …`: the same as the `minidit` command."""

import sys

from minidit.cli import main

sys.exit(main())
