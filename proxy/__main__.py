"""`python -m proxy` is the `shaper` command."""

import sys

from .cli import main

sys.exit(main())
