"""`python -m iota` is the `iota` command."""

import sys

from iota.cli import main

sys.exit(main())
