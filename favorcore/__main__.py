"""``python -m favorcore``: the command line (see :mod:`favorcore.cli`)."""

import sys

from .cli import main

sys.exit(main())
