"""Pseudonymisation of user ids: a keyed (salted) SHA-256, applied at ingest before any write.

The same salt gives the same pseudonym on every run, so runs stay comparable and labels can
still be joined (they are pseudonymised with the same function); without the salt a
pseudonym cannot be reversed by hashing candidate ids. The salt is never logged or stored.
"""

from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

PSEUDONYM_CHARS = 32  # 128 bits of SHA-256


def pseudonym(user_id: Column, salt: str) -> Column:
    """``sha256(salt || '|' || user_id)``, first 32 hex characters; null stays null."""
    return F.substring(F.sha2(F.concat(F.lit(salt + "|"), user_id), 256), 1, PSEUDONYM_CHARS)


def pseudonym_py(user_id: str, salt: str) -> str:
    """The same function in Python (tests, support lookups of one known user)."""
    return hashlib.sha256(f"{salt}|{user_id}".encode()).hexdigest()[:PSEUDONYM_CHARS]


def redacted(raw: Column) -> Column:
    """What a quarantined malformed line keeps when user ids must not be written: its length
    and a digest (to find it again in the source), not its text."""
    return F.concat(
        F.lit("<redacted: "), F.length(raw).cast("string"), F.lit(" chars, sha256 "), F.substring(F.sha2(raw, 256), 1, 16), F.lit(">")
    )
