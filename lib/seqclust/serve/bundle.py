"""A model run as a folder a service loads (``seqclust.serve.request.Segmenter``): its encoder
artifact, copied, and ``segments.json`` — the centres of every node of its segment tree, its
token segments, each segment's description and the run's own source, sessionize and embed
settings (so a request is read, cut into sessions and embedded as the model run's data was).
Read from the run's tables (Spark); what it writes is JSON and the encoder's own files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from seqclust.core.config import EmbedConfig, PipelineConfig, SessionizeConfig, SourceConfig, build_section, validate_run_id
from seqclust.core.errors import InputError
from seqclust.runtime.context import RunContext
from seqclust.runtime.store import table_store
from seqclust.serve.placement import run_segments
from seqclust.serve.request import BUNDLE_FILE, Limits, spec_json

log = logging.getLogger(__name__)


def write_bundle(spark: SparkSession, cfg: PipelineConfig, run_id: str, out: str | Path, limits: Limits | None = None) -> Path:
    """Write model run ``run_id``'s folder to ``out`` (replaced if it exists); return it."""
    validate_run_id(run_id)
    store = table_store(cfg)
    ctx = RunContext(run_id=run_id, store=store, tables=cfg.tables, started_at=dt.datetime.now(dt.timezone.utc))
    row = None
    if store.exists(cfg.tables.runs):
        row = store.read(spark, cfg.tables.runs, run_id).select("status", "encoder_path", "encoder_id", "config_json").first()
    if row is None or not row["encoder_path"]:
        raise InputError(f"model run {run_id}: no such run with an encoder under {store.root}")
    if row["status"] != "succeeded":
        raise InputError(f"model run {run_id}: that run did not succeed (status {row['status']})")
    conf = json.loads(row["config_json"] or "{}")
    source = build_section(SourceConfig, conf.get("source", {}), "source")
    sessionize = build_section(SessionizeConfig, conf.get("sessionize", {}), "sessionize")
    embed = build_section(EmbedConfig, conf.get("embed", {}), "embed")
    if embed.pooling != "mean":
        raise InputError(
            f"model run {run_id}: embed.pooling is {embed.pooling}; a request is scored with mean pooling (the recency weights "
            "depend on the newest session in a whole log)"
        )
    refine_on = conf.get("cluster", {}).get("refine", cfg.cluster.refine) != "none"
    centers, tokens, tree = run_segments(spark, ctx, run_id, refine_on)
    descriptions: dict[str, str] = {}
    if store.exists(cfg.tables.cluster_profiles):
        prof = store.read(spark, cfg.tables.cluster_profiles, run_id)
        for r in prof.select("granularity", "cluster_id", "segment_path", "description").where(F.col("description").isNotNull()).collect():
            path = r["segment_path"] or (str(r["cluster_id"]) if r["granularity"] == "coarse" else None)
            if path is not None and (r["granularity"] != "coarse" or path not in descriptions):
                descriptions[path] = r["description"]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(row["encoder_path"], out / "encoder")
    spec = {
        "model_run_id": run_id,
        "encoder_id": row["encoder_id"],
        "centers": centers,
        "tree": [[p, [float(v) for v in c]] for p, c in zip(tree.paths, tree.centers)] if tree is not None else None,
        "token_segments": tokens or None,
        "descriptions": descriptions,
        "source": dataclasses.asdict(source),
        "sessionize": dataclasses.asdict(sessionize),
        "embed": dataclasses.asdict(embed),
        "limits": dataclasses.asdict(limits or Limits()),
    }
    (out / BUNDLE_FILE).write_text(spec_json(spec))
    log.info("model run %s: %d segments (%d in its tree) written to %s", run_id, len(centers), len(spec["tree"] or []), out)
    return out
