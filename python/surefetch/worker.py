"""`python -m surefetch.worker`: a supervised worker process (see
:mod:`surefetch.supervisor.worker`, where the code lives).

The supervisor starts workers with this command, and ``--worker-command`` wrappers
run it too, so it stays.
"""

from __future__ import annotations

import sys

from surefetch.supervisor.worker import EXIT_CONFIG, main

__all__ = ["EXIT_CONFIG", "main"]

if __name__ == "__main__":
    sys.exit(main())
