"""Audiences: a run's segments as lists of users, ready for an ad or CRM tool.

One audience per segment (``segment=<id>/`` folders of CSV or Parquet, or a Delta table
partitioned by ``segment``): pseudonymised user id, segment, its description, run id, model run
id and encoder id, with each user's confidence (``--min-confidence`` keeps only the users at
least that sure of their segment). Segments smaller than ``min_size`` users are withheld and
counted, so no tiny group can be singled out. User ids leave as pseudonyms: those of a run that pseudonymised at
ingest (``privacy.pseudonymize``) as they are; otherwise they are pseudonymised here with the
salt of ``privacy.salt_env`` (the same keyed hash, so an audience joins with a pseudonymised
run's tables). ``raw_ids`` exports them unchanged, for a system that must join on them.

The target folder is replaced only when it is empty, absent or an earlier export (it holds
``_SEQCLUST_EXPORT.json``), never an unrelated folder.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from seqclust.core.config import PipelineConfig
from seqclust.core.errors import ConfigError, InputError
from seqclust.core.privacy import pseudonym
from seqclust.runtime.store import table_store
from seqclust.segment.cluster import at_level

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "delta")
MARKER = "_SEQCLUST_EXPORT.json"


@dataclass
class ExportResult:
    path: str
    fmt: str
    users: int
    audiences: dict[int, int]  # segment -> users exported
    withheld: dict[int, int] = field(default_factory=dict)  # segment -> users (below min_size)
    ids: str = "pseudonymised"

    def summary(self) -> str:
        s = f"exported {self.users} users in {len(self.audiences)} audiences ({self.ids} ids) to {self.path} ({self.fmt})"
        if self.withheld:
            w = ", ".join(f"segment {c} ({n} users)" for c, n in sorted(self.withheld.items()))
            s += f"; withheld {len(self.withheld)} segment(s) under the minimum size: {w}"
        return s


def audiences(
    spark: SparkSession,
    cfg: PipelineConfig,
    run_id: str,
    min_size: int = 50,
    raw_ids: bool = False,
    level: str = "top",
    min_confidence: float | None = None,
) -> tuple[DataFrame, dict[int, int], dict[int, int], str]:
    """The rows to export (user_id, segment, segment_path, confidence, description, run_id,
    model_run_id, encoder_id), the exported and the withheld segment sizes, and how the ids
    were treated. ``level``: the top level of the segment tree or its leaves;
    ``min_confidence``: only the members whose ``clusters.confidence`` at that level is at
    least this (segment sizes, and so ``min_size``, count them alone). InputError for a run
    that does not exist, has no segments, or (with ``min_confidence``) no confidences."""
    if min_size < 1:
        raise ConfigError("--min-size: must be >= 1")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ConfigError(f"--min-confidence: {min_confidence} is not in [0, 1]")
    store = table_store(cfg)
    t = cfg.tables
    rec = _record(spark, store, t.runs, run_id)
    seg = at_level(store.read(spark, t.clusters, run_id), level).where(F.col("entity_type") == "user") if store.exists(t.clusters) else None
    if seg is not None and "confidence" not in seg.columns:  # a run written before confidences
        seg = seg.withColumn("confidence", F.lit(None).cast("double"))
    if seg is not None and min_confidence is not None:
        if seg.where(F.col("confidence").isNotNull()).limit(1).count() == 0:
            raise InputError(f"--min-confidence: run {run_id} has no confidence per user (written by an older seqclust); re-run it")
        seg = seg.where(F.col("confidence") >= min_confidence)
    sizes = (
        {int(r["cluster_id"]): int(r["count"]) for r in seg.groupBy("cluster_id").count().collect()} if seg is not None else {}
    )  # k rows
    if seg is None or not sizes:
        raise InputError(f"--run-id {run_id}: the run has no segments (status {rec['status']}; did its cluster stage complete?)")
    conf = json.loads(rec["config_json"] or "{}")
    model_run = (conf.get("cluster") or {}).get("model_run") or run_id
    user, ids = _user_ids(cfg, run_id, already=bool((conf.get("privacy") or {}).get("pseudonymize")), raw_ids=raw_ids)
    withheld = {c: n for c, n in sizes.items() if n < min_size}
    kept = {c: n for c, n in sizes.items() if n >= min_size}
    desc = (
        at_level(store.read(spark, t.cluster_profiles, run_id), level).select("cluster_id", "description")
        if store.exists(t.cluster_profiles)
        else spark.createDataFrame([], "cluster_id int, description string")
    )
    if "segment_path" not in seg.columns:  # a run written before the segment tree
        seg = seg.withColumn("segment_path", F.col("cluster_id").cast("string"))
    rows = (
        seg.where(F.col("cluster_id").isin(list(kept)) if kept else F.lit(False))
        .join(desc, "cluster_id", "left")
        .select(
            user.alias("user_id"),
            F.col("cluster_id").alias("segment"),
            "segment_path",
            "confidence",
            "description",
            F.lit(run_id).alias("run_id"),
            F.lit(model_run).alias("model_run_id"),
            F.lit(rec["encoder_id"]).cast("string").alias("encoder_id"),
        )
    )
    return rows, kept, withheld, ids


def _record(spark: SparkSession, store: Any, runs: str, run_id: str) -> Any:
    """The run's record; an InputError naming the latest runs when there is none."""
    rec = store.read(spark, runs, run_id).first() if store.exists(runs) else None
    if rec is None:
        known = []
        if store.exists(runs):
            known = [r["run_id"] for r in store.read(spark, runs).orderBy(F.desc("started_at")).select("run_id").limit(5).collect()]
        hint = f"; latest runs there: {', '.join(known)}" if known else "; there are no runs there"
        raise InputError(f"--run-id {run_id}: no such run under {store.root}{hint}")
    return rec


def _user_ids(cfg: PipelineConfig, run_id: str, already: bool, raw_ids: bool) -> tuple[Column, str]:
    """The exported user id column and how it was treated: a run pseudonymised at ingest as it
    is, ``raw_ids`` unchanged, otherwise pseudonymised with the salt of ``privacy.salt_env``."""
    user = F.col("entity_id")
    if already:
        return user, "pseudonymised"
    if raw_ids:
        log.warning("export: user ids leave as they are (--raw-ids)")
        return user, "raw"
    salt_env = cfg.privacy.salt_env
    salt = os.environ.get(salt_env, "")
    if len(salt) < cfg.privacy.min_salt_length:
        raise ConfigError(
            f"run {run_id} kept raw user ids and ${salt_env} is {'unset' if not salt else 'too short'}: export a secret of at least "
            f"{cfg.privacy.min_salt_length} characters to pseudonymise the audiences, or pass --raw-ids to export the ids as they are"
        )
    return pseudonym(user, salt), "pseudonymised"


def _prepare(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier export (or empty)."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: is a file")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(f"--out {out}: the folder has files that are not an earlier seqclust export; choose an empty or new folder")
        shutil.rmtree(out)


def export(
    spark: SparkSession,
    cfg: PipelineConfig,
    run_id: str,
    fmt: str,
    out: str,
    min_size: int = 50,
    raw_ids: bool = False,
    level: str = "top",
    min_confidence: float | None = None,
) -> ExportResult:
    """Write the run's audiences to ``out``; see the module's text."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if "://" in out:
        raise ConfigError(f"--out {out}: a local or mounted folder is expected (write to a cloud path with --format delta via a mount)")
    rows, kept, withheld, ids = audiences(spark, cfg, run_id, min_size, raw_ids, level, min_confidence)
    path = Path(out).resolve()
    _prepare(path)
    w = rows.repartition("segment").sortWithinPartitions("segment", "user_id").write.partitionBy("segment").mode("overwrite")
    if fmt == "csv":
        w.option("header", True).csv(str(path))
    elif fmt == "parquet":
        w.parquet(str(path))
    else:
        w.format("delta").save(str(path))
    res = ExportResult(str(path), fmt, sum(kept.values()), kept, withheld, ids)
    manifest = {
        "run_id": run_id,
        "format": fmt,
        "level": level,
        "min_size": min_size,
        "min_confidence": min_confidence,
        "ids": ids,
        "audiences": {str(c): n for c, n in sorted(kept.items())},
        "withheld": {str(c): n for c, n in sorted(withheld.items())},
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (path / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("export: %s", res.summary())
    return res
