"""Seeded samples that do not change with partitioning or row order, and bootstrap intervals:
one hash stream for the random baseline, the bootstrap buckets and the user samples that every
stage draws from."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F


def bootstrap_ci(values: Sequence[float], seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and a percentile bootstrap interval of that mean."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def hash_uniform(*cols: str, seed: int) -> Column:
    """A uniform draw in [0, 1) from a seeded 64-bit hash of ``cols``: a function of the row's
    values, so it does not change with partitioning or row order (``rand`` does). The random
    baseline, the bootstrap buckets and the user samples (``in_user_sample``) all draw with it."""
    h = F.xxhash64(*[F.col(c) for c in cols], F.lit(seed)).bitwiseAND(F.lit(0x7FFFFFFFFFFFFFFF))
    return h.cast("double") / float(2**63)


SAMPLE_SEED_OFFSET = 104_729  # the user samples draw from their own hash stream


def in_user_sample(col: str, fraction: float, seed: int) -> Column:
    """True for a seeded hash sample of about ``fraction`` of the values of ``col``: the same
    users in every table keyed by them (events, sessions, vectors) and on any partitioning.
    Its hash stream is not ``seed``'s, so the users it keeps are not biased in the random
    baseline's or the bootstrap's draws (which hash with ``seed`` itself)."""
    return hash_uniform(col, seed=seed + SAMPLE_SEED_OFFSET) < F.lit(float(fraction))


def user_sample(n_users: int, limit: int | None, seed: int) -> Callable[[DataFrame, str], DataFrame]:
    """``keep(df, user_col)``: every row while ``n_users <= limit`` (or ``limit`` is None), else
    the rows of a seeded hash sample of about ``limit`` users (``in_user_sample``) — the same
    users in every table it is applied to."""
    if limit is None or n_users <= limit:
        return lambda df, col: df
    fraction = limit / n_users
    return lambda df, col: df.where(in_user_sample(col, fraction, seed))
