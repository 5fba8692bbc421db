"""Clustering agreement from contingency tables built in Spark, and bootstrap intervals.

Only the k x m contingency table reaches the driver; the formulas match scikit-learn's
(which is the test oracle).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def contingency(df: DataFrame, label_col: str, cluster_col: str) -> np.ndarray:
    """Counts of (label, cluster) pairs as a dense [labels, clusters] matrix (built in Spark)."""
    return contingencies(df, label_col, [cluster_col]).get(cluster_col, np.zeros((0, 0), dtype=np.int64))


def contingencies(df: DataFrame, label_col: str, cluster_cols: Sequence[str]) -> dict[str, np.ndarray]:
    """``contingency(df, label_col, c)`` for every ``c`` of ``cluster_cols``, from one Spark job:
    each row is counted once per column as (label, column, cluster), so at most
    labels x clusters x columns counts reach the driver. Rows where ``c`` is null do not count
    for ``c``; a column with no counted row is left out of the result."""
    pairs = F.explode(F.array(*[F.struct(F.lit(c).alias("col"), F.col(c).cast("long").alias("cluster")) for c in cluster_cols]))
    rows = (
        df.select(F.col(label_col).alias("label"), pairs.alias("p"))
        .select("label", "p.col", "p.cluster")
        .where(F.col("cluster").isNotNull())
        .groupBy("label", "col", "cluster")
        .count()
        .collect()
    )
    out = {}
    for c in cluster_cols:
        mine = [r for r in rows if r["col"] == c]
        if not mine:
            continue
        li = {v: i for i, v in enumerate(sorted({str(r["label"]) for r in mine}))}
        ci = {v: i for i, v in enumerate(sorted({r["cluster"] for r in mine}))}
        m = np.zeros((len(li), len(ci)), dtype=np.int64)
        for r in mine:
            m[li[str(r["label"])], ci[r["cluster"]]] += r["count"]
        out[c] = m
    return out


def _comb2(x: np.ndarray | float) -> Any:
    return x * (x - 1) / 2.0


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    p = counts / n
    return float(-(p * np.log(p)).sum())


def external_scores(table: np.ndarray) -> dict[str, float]:
    """ARI, NMI (arithmetic), homogeneity, completeness, V-measure from a contingency table
    (rows = true labels, columns = clusters), matching scikit-learn's definitions."""
    t = np.asarray(table, dtype=np.float64)
    n = t.sum()
    a, b = t.sum(axis=1), t.sum(axis=0)
    sum_ij, sum_a, sum_b = _comb2(t).sum(), _comb2(a).sum(), _comb2(b).sum()
    total = _comb2(n)
    expected = sum_a * sum_b / total if total > 0 else 0.0
    max_index = (sum_a + sum_b) / 2.0
    ari = 1.0 if max_index == expected else float((sum_ij - expected) / (max_index - expected))
    h_c, h_k = _entropy(a), _entropy(b)
    nz = t > 0
    outer = np.outer(a, b)
    mi = float((t[nz] / n * (np.log(t[nz] * n) - np.log(outer[nz]))).sum()) if n > 0 else 0.0
    mi = max(mi, 0.0)
    homogeneity = 1.0 if h_c == 0 else mi / h_c
    completeness = 1.0 if h_k == 0 else mi / h_k
    v = 0.0 if homogeneity + completeness == 0 else 2 * homogeneity * completeness / (homogeneity + completeness)
    if (t.shape[0] == 1 and t.shape[1] == 1) or (t.shape[0] == 0 and t.shape[1] == 0):
        nmi = 1.0
    else:
        nmi = mi / max((h_c + h_k) / 2.0, np.finfo(np.float64).eps)
    return {"ari": ari, "nmi": float(nmi), "homogeneity": float(homogeneity), "completeness": float(completeness), "v_measure": float(v)}
