"""`python -m surefetch`: the command line."""

from surefetch.cli import run

run()
