"""`python -m surefetch.cli`: the command line."""

from surefetch.cli import run

run()
