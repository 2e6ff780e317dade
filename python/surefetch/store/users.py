"""Users of the HTTP API and their bearer tokens (the ``tokens`` table).

A user is a name; ``surefetch users add NAME`` gives it a new token. Only a
token's SHA-256 is stored, so a leaked database does not leak tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from surefetch.store.checks import MAX_OWNER, check_text
from surefetch.store.db import Database, Migration, register_migration

__all__ = ["add_user", "authenticate", "revoke_token"]

register_migration(
    Migration(
        version=1,
        step=1,
        owner="surefetch.store.users",
        statements=(
            """CREATE TABLE tokens (
                token_hash TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX tokens_owner ON tokens (owner)",
        ),
    )
)


def add_user(db: Database, name: str) -> str:
    """Creates a new API token for user ``name`` (a user may hold several).

    Only the token's SHA-256 is stored; the token itself is returned once.

    Args:
        db: the store's database.
        name: the user name; sessions created with the token belong to it.

    Returns:
        The new bearer token.

    Raises:
        ValueError: an empty, too long or non-text name.
    """
    check_text("user name", name, MAX_OWNER)
    token = secrets.token_urlsafe(32)
    with db.connection() as conn:
        db.execute(
            conn,
            "INSERT INTO tokens (token_hash, owner, created_at) VALUES (?, ?, ?)",
            (_hash_token(token), name, time.time()),
        )
    return token


def revoke_token(db: Database, token: str) -> bool:
    """Removes a token: requests with it are refused from now on.

    Args:
        db: the store's database.
        token: the token `add_user` returned.

    Returns:
        Whether the token existed.
    """
    with db.connection() as conn:
        cursor = db.execute(conn, "DELETE FROM tokens WHERE token_hash = ?", (_hash_token(token),))
        return bool(cursor.rowcount)


def authenticate(db: Database, token: str) -> str | None:
    """The user a bearer token belongs to, or None for an unknown token.

    Args:
        db: the store's database.
        token: the token as the client sent it.
    """
    if not isinstance(token, str) or not token or len(token) > 512:
        return None
    digest = _hash_token(token)
    with db.connection() as conn:
        row = db.execute(
            conn, "SELECT token_hash, owner FROM tokens WHERE token_hash = ?", (digest,)
        ).fetchone()
    if row is None or not hmac.compare_digest(str(row[0]), digest):
        return None
    return str(row[1])


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
