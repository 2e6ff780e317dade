"""`python -m surefetch.cli`: the command line."""

import sys

from surefetch.cli import main

sys.exit(main())
