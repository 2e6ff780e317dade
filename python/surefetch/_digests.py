"""`hashlib`'s BLAKE2b and SHA-256 for the short keys surefetch digests (lock places,
URL keys), taken from Python's built-in modules: importing `hashlib` loads OpenSSL,
~2 ms of every start, for strings of a few dozen bytes. (File contents are hashed by
the engine.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["blake2b", "sha256"]

if TYPE_CHECKING:
    from hashlib import blake2b, sha256
else:
    try:
        from _blake2 import blake2b
    except ImportError:  # a Python built without its own BLAKE2
        from hashlib import blake2b
    try:
        from _sha2 import sha256  # Python 3.12 and later
    except ImportError:
        try:
            from _sha256 import sha256
        except ImportError:  # a Python built without its own SHA-2
            from hashlib import sha256
