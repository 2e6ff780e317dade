"""`surefetch --version` and `surefetch.__version__`: one version, from Cargo.toml."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import surefetch

from support import run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CARGO_TOML = Path(__file__).resolve().parent.parent / "Cargo.toml"


def test_version_is_the_crates() -> None:
    crate = tomllib.loads(CARGO_TOML.read_text())["package"]["version"]
    assert surefetch.__version__ == crate
    assert metadata.version("surefetch") == crate


def test_cli_prints_the_version() -> None:
    for flag in ("--version", "-V"):
        out = run_cli([flag])
        assert (out.returncode, out.stdout, out.stderr) == (
            0,
            f"surefetch {surefetch.__version__}\n",
            "",
        )


def test_version_is_listed_in_help() -> None:
    out = run_cli(["--help"])
    assert out.returncode == 0
    assert "--version" in out.stdout
