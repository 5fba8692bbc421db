"""Run the stages in order for one run id and keep the ``runs`` table up to date.

Each stage reads what the previous one committed to Delta for the same run id, so a stage
can also run alone (``seqclust <stage> --run-id ...``, a Databricks task, an Airflow task).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from seqclust.core.config import PipelineConfig
from seqclust.core.errors import ConfigError, InputError, SeqclustError
from seqclust.core.stages import STAGES
from seqclust.core.tables import RUNS, RunRecord
from seqclust.evaluate import stage as evaluate_stage
from seqclust.ingest import stage as ingest_stage
from seqclust.represent import embed as embed_stage
from seqclust.represent import train as train_stage
from seqclust.runtime import lease
from seqclust.runtime.context import RunContext
from seqclust.runtime.spark import scale_shuffle
from seqclust.runtime.store import table_store
from seqclust.segment import cluster as cluster_stage
from seqclust.sessionize import stage as sessionize_stage

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def save_record(spark: SparkSession, ctx: RunContext, rec: RunRecord) -> None:
    ctx.write(spark.createDataFrame([rec.row()], RUNS), "runs", count=False)


def load_record(spark: SparkSession, ctx: RunContext) -> RunRecord | None:
    if not ctx.store.exists(ctx.tables.runs):
        return None
    row = ctx.store.read(spark, ctx.tables.runs, ctx.run_id).first()
    if row is None:
        return None
    return RunRecord.from_row(row.asDict())


def make_context(
    cfg: PipelineConfig,
    input_path: str | None,
    labels_path: str | None,
    run_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> RunContext:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    rid = run_id or cfg.run.run_id or f"{now:%Y%m%dT%H%M%S}-{cfg.config_hash()[:6]}"
    return RunContext(
        run_id=rid,
        store=table_store(cfg),
        tables=cfg.tables,
        started_at=now,
        input_path=input_path,
        labels_path=labels_path,
        since=since,
        until=until,
    )


def with_model_run_encoder(spark: SparkSession, cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``encoder.path`` set to the encoder of ``cluster.model_run`` (for assign)."""
    rid = cfg.cluster.model_run
    store = table_store(cfg)
    row = None
    if rid and store.exists(cfg.tables.runs):
        row = store.read(spark, cfg.tables.runs, rid).select("status", "encoder_path").first()
    if row is None or not row["encoder_path"]:
        raise InputError(f"--model {rid}: no such run with an encoder under {store.root}")
    if row["status"] != "succeeded":
        raise InputError(f"--model {rid}: that run did not succeed (status {row['status']})")
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, path=cfg.encoder.path or row["encoder_path"]))


@dataclass
class RunSummary:
    run_id: str
    record: RunRecord
    table_rows: dict[str, int]
    metrics: dict[str, dict[str, float]]
    table_root: str
    seconds: float
    k_choice: dict[str, Any] | None = None
    report: Path | None = None
    # table_rows: the run's rows in each table (True) or the rows this command wrote (a single stage)
    whole_run_rows: bool = True
    # how far each level holds, in sentences (seqclust.evaluate.trust)
    trust: list[str] = dataclasses.field(default_factory=list)


# Each stage: (spark, cfg, ctx, rec, state) -> None. It reads what earlier stages committed for
# the run id, commits its own tables, and notes what the ``runs`` row should say in ``rec``;
# ``state`` carries what a later stage of the same process may reuse (the encoder artifact).
StageFn = Callable[[SparkSession, PipelineConfig, RunContext, RunRecord, dict[str, Any]], None]


def _ingest(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, state: dict[str, Any]) -> None:
    r = ingest_stage.run(spark, ctx, cfg.source, salt=cfg.privacy.salt())
    rec.rows_input, rec.rows_clean, rec.rows_quarantined, rec.rows_duplicates = (
        r.input_rows,
        r.clean_rows,
        r.quarantined_rows,
        r.duplicate_rows,
    )
    rec.quarantine_reasons = r.reasons
    rec.rows_empty_optional = r.empty_optional
    rec.rows_out_of_window = r.out_of_window_rows
    rec.input_fingerprint, rec.input_delta_version, rec.input_files = r.input_fingerprint, r.input_version, r.input_files


def _sessionize(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, state: dict[str, Any]) -> None:
    s = sessionize_stage.run(spark, ctx, cfg.sessionize)
    rec.sessions, rec.users, rec.sessions_quarantined = s.sessions, s.users, s.quarantined_sessions


def _train(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, state: dict[str, Any]) -> None:
    keep = any(s in state.get("stages", ()) for s in ("embed", "cluster"))  # a later stage of this process uses them
    t, art = train_stage.run(spark, ctx, cfg.tokenize, cfg.encoder, cfg.run.seed, cfg.embed, keep_counts=keep)
    rec.encoder_id, rec.encoder_path = t.encoder_id, t.path
    state["artifact"] = art
    if t.token_counts is not None:
        state["token_counts"] = (art.encoder_id, t.token_counts)


def _embed(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, state: dict[str, Any]) -> None:
    art = state.get("artifact")
    if art is None:
        from seqclust.represent.encoder import load_artifact

        path = cfg.encoder.path or rec.encoder_path
        if not path:
            raise InputError(f"run {ctx.run_id}: no encoder yet; run the train stage first or pass --encoder PATH")
        art = load_artifact(path)
        rec.encoder_id, rec.encoder_path = art.encoder_id, str(art.path)
    embed_stage.run(spark, ctx, cfg.embed, art, reused=bool(cfg.encoder.path), counts=_counts(state, art))


def _counts(state: dict[str, Any], art: Any) -> Any:
    """The users' behaviour-token counts the train stage of this process counted for ``art``
    (None: count them): counted once per process, not once per stage."""
    kept = state.get("token_counts")
    return kept[1] if kept is not None and art is not None and kept[0] == art.encoder_id else None


def _release_counts(state: dict[str, Any]) -> None:
    if "token_counts" in state:
        state.pop("token_counts")[1].unpersist()


def _cluster(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, state: dict[str, Any]) -> None:
    art = state.get("artifact")
    path = cfg.encoder.path or rec.encoder_path
    if art is None and (cfg.cluster.refine != "none" or cfg.cluster.split_max_depth > 1) and path:
        from seqclust.represent.encoder import load_artifact

        art = load_artifact(path)
    hv = embed_stage.history_vectors(art, cfg.embed) if art is not None else None
    c = cluster_stage.run(spark, ctx, cfg.cluster, cfg.run.seed, artifact=art, counts=_counts(state, art), history=hv)
    rec.k = c.k
    rec.users = c.users
    state["k_choice"] = next(
        ({"rule": c.rule, "uncertain": c.uncertain, "runner_up": c.runner_up, **r} for r in c.sweep if r["k"] == c.k), None
    )


def _evaluate(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, state: dict[str, Any]) -> None:
    art = state.get("artifact")
    if art is None and rec.encoder_path:
        from seqclust.represent.encoder import load_artifact

        art = load_artifact(rec.encoder_path)
    hv = embed_stage.history_vectors(art, cfg.embed) if art is not None else None
    e = evaluate_stage.run(
        spark,
        ctx,
        cfg.run.seed,
        cfg.labels,
        cfg.cluster,
        cfg.baseline,
        salt=cfg.privacy.salt(),
        evaluate_cfg=cfg.evaluate,
        history_vectors=hv,
    )
    state["metrics"] = e.metrics


RUNNERS: dict[str, StageFn] = {
    "ingest": _ingest,
    "sessionize": _sessionize,
    "train": _train,
    "embed": _embed,
    "cluster": _cluster,
    "evaluate": _evaluate,
}
if tuple(RUNNERS) != STAGES:  # pragma: no cover - a stage added to one list and not the other
    raise RuntimeError(f"pipeline.RUNNERS {tuple(RUNNERS)} is not seqclust.core.stages.STAGES {STAGES}")


def run(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, stages: tuple[str, ...] = STAGES, resume: bool = False) -> RunSummary:
    """Run ``stages`` for ``ctx.run_id``; the ``runs`` row says how far it got and why it stopped.

    With ``resume``, stages the run already completed are skipped (each stage commits its
    tables before it is marked complete, so a completed stage's output is whole).
    """
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    whole = len(stages) > 1  # run / assign, not one stage's process (before --resume drops stages)
    cfg.privacy.salt()  # a missing salt fails before any work, not after ingest
    t_run = time.perf_counter()
    previous = load_record(spark, ctx)
    if resume and previous is not None:
        if previous.config_hash and previous.config_hash != cfg.config_hash():
            raise ConfigError(
                f"--resume: run {ctx.run_id} was started with another configuration (hash {previous.config_hash}, now {cfg.config_hash()}); "
                "resume with the same options or use a new run id"
            )
        done = [s for s in stages if s in previous.stages_completed]
        stages = tuple(s for s in stages if s not in previous.stages_completed)
        log.info("resume run %s: %s already completed", ctx.run_id, ", ".join(done) or "no stage")
        rec = previous
    elif previous is not None and stages[0] != STAGES[0]:
        rec = previous  # a single later stage of an existing run
    else:
        rec = RunRecord(started_at=ctx.started_at, git_commit=git_commit())
    if not stages:
        log.info("run %s: every stage already completed", ctx.run_id)
    rec.status, rec.error, rec.finished_at = "running", None, None
    rec.config_json, rec.config_hash = cfg.to_json(), cfg.config_hash()
    rec.window_since, rec.window_until = ctx.since, ctx.until
    rec.input_path = ctx.input_path or rec.input_path
    rec.labels_path = ctx.labels_path or rec.labels_path
    me = lease.new_owner()
    lease.acquire(spark, ctx, rec, previous, me, cfg.run.lease_timeout_s)  # writes rec; refuses a second live process
    state: dict[str, Any] = {"stages": stages}
    current = None
    heartbeat = lease.Heartbeat(spark, ctx, me, cfg.run.lease_timeout_s / 5).start()
    try:
        for i, name in enumerate(stages):
            current = name
            log.info("stage %s: start (run %s)", name, ctx.run_id)
            t0 = time.perf_counter()
            scale_shuffle(spark, rec.rows_clean)  # from the run's clean rows (ingest: from its input's, once counted)
            RUNNERS[name](spark, cfg, ctx, rec, state)
            rec.stage_seconds = {**rec.stage_seconds, name: round(time.perf_counter() - t0, 3)}
            rec.stages_completed = [s for s in rec.stages_completed if s != name] + [name]
            if i < len(stages) - 1:  # the last stage's completion is in the closing commit below
                save_record(spark, ctx, rec)
            log.info("stage %s: done in %.1fs", name, rec.stage_seconds[name])
    except BaseException as e:
        heartbeat.stop()
        _release_counts(state)
        rec.status, rec.lease_owner = "failed", None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rec.error = f"{current}: {msg}"[:2000]
        rec.finished_at = dt.datetime.now(dt.timezone.utc)
        try:
            save_record(spark, ctx, rec)
        except Exception as bookkeeping:  # the original error matters more than the bookkeeping
            log.error("could not record the failure of run %s in the runs table: %s", ctx.run_id, str(bookkeeping).splitlines()[0][:300])
            log.debug("the bookkeeping error", exc_info=True)
        if isinstance(e, SeqclustError) or not isinstance(e, Exception):
            raise
        raise SeqclustError(f"stage {current} failed: {msg[:500]}") from e
    heartbeat.stop()
    _release_counts(state)
    rec.status = "succeeded" if set(STAGES) <= set(rec.stages_completed) else "running"
    rec.lease_owner = None  # released: the next stage's process (or a rerun) may take it
    rec.finished_at = dt.datetime.now(dt.timezone.utc)
    save_record(spark, ctx, rec)
    report = None
    if "evaluate" in stages:
        from seqclust.report.page import write_report

        report = write_report(spark, ctx, cfg)
        rec.report_path = str(report)
        if cfg.tracking.mlflow:
            rec.mlflow_run_id = _track(cfg, ctx, rec, spark)
        save_record(spark, ctx, rec)
    return _summary(spark, ctx, rec, state, whole, time.perf_counter() - t_run, report)


def _summary(
    spark: SparkSession, ctx: RunContext, rec: RunRecord, state: dict[str, Any], whole: bool, seconds: float, report: Path | None
) -> RunSummary:
    """A whole run counts its rows in every table (one job); a single stage (a scheduler's task,
    a process of its own) says what it wrote: counting ten tables again would cost it ~10 s of a
    cold JVM. Metrics: this process's evaluation, else (a whole run) the table's."""
    table_rows = _run_row_counts(spark, ctx) if whole else dict(ctx.written)
    metrics = state.get("metrics") or (_read_metrics(spark, ctx) if whole else {})
    trust = run_trust(spark, ctx) if whole or "metrics" in state else []
    return RunSummary(ctx.run_id, rec, table_rows, metrics, ctx.store.root, seconds, state.get("k_choice"), report, whole, trust)


def run_trust(spark: SparkSession, ctx: RunContext) -> list[str]:
    """The run's verdicts per level (``seqclust.evaluate.trust``) from its ``metrics`` rows."""
    from seqclust.evaluate.trust import statements

    if not ctx.store.exists(ctx.tables.metrics):
        return []
    fams = ("downstream", "temporal", "confidence", "hierarchy")
    rows = ctx.store.read(spark, ctx.tables.metrics, ctx.run_id).where(F.col("family").isin(*fams)).collect()  # hundreds of rows
    return statements([r.asDict() for r in rows])


def _run_row_counts(spark: SparkSession, ctx: RunContext) -> dict[str, int]:
    """Rows of this run in every table, counted in one Spark job (a union of per-table counts)."""
    names = [t for t in ctx.tables.names() if ctx.store.exists(t)]
    if not names:
        return {}
    parts = [ctx.store.read(spark, t, ctx.run_id).select(F.lit(t).alias("table")) for t in names]
    union = parts[0]
    for p in parts[1:]:
        union = union.unionByName(p)
    got = {r["table"]: r["count"] for r in union.groupBy("table").count().collect()}
    return {t: int(got.get(t, 0)) for t in names}


def _track(cfg: PipelineConfig, ctx: RunContext, rec: RunRecord, spark: SparkSession) -> str:
    """Log the run to MLflow (its tables are committed already; a failure here fails the run's
    command with a clear error but leaves the tables and the run record as they are)."""
    from seqclust.runtime.tracking import log_run

    rows = [r.asDict() for r in ctx.store.read(spark, ctx.tables.metrics, ctx.run_id).collect()]  # a few hundred rows
    also = None
    if not cfg.cluster.model_run and rec.status == "succeeded" and rec.encoder_path:  # a model run: its segments model too

        def also() -> None:
            _log_segments_model(spark, cfg, ctx)

    try:
        return log_run(cfg, ctx.run_id, dataclasses.asdict(rec), rows, rec.encoder_path, rec.report_path, also)
    except SeqclustError:
        raise
    except Exception as e:
        raise SeqclustError(
            f"tracking: MLflow logging of run {ctx.run_id} failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e


def _log_segments_model(spark: SparkSession, cfg: PipelineConfig, ctx: RunContext) -> None:
    """The model run as an MLflow model (``serve.mlflow_model``), registered under
    ``tracking.registered_model``; its input example: a few of the run's own events."""
    import tempfile

    from seqclust.serve.bundle import write_bundle
    from seqclust.serve.mlflow_model import log_segments_model

    example = None
    if ctx.store.exists(ctx.tables.events):
        cols = ["user_id", "ts", "event_type", "item_id", "category_id", "price"]
        ev: Any = ctx.store.read(spark, ctx.tables.events, ctx.run_id).select(*cols).limit(5).toPandas()
        example = ev.assign(ts=ev["ts"].astype("datetime64[ns]").dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    with tempfile.TemporaryDirectory() as d:
        folder = write_bundle(spark, cfg, ctx.run_id, Path(d) / "model")
        log_segments_model(folder, ctx.run_id, cfg.tracking.registered_model, example)


def _read_metrics(spark: SparkSession, ctx: RunContext) -> dict[str, dict[str, float]]:
    if not ctx.store.exists(ctx.tables.metrics):
        return {}
    out: dict[str, dict[str, float]] = {}
    for r in (
        ctx.store.read(spark, ctx.tables.metrics, ctx.run_id)
        .where(F.col("family").isin("internal", "external", "proxy", "downstream", "drift", "temporal"))
        .collect()
    ):
        out.setdefault(r["method"], {})[r["metric"]] = r["value"]
    return out


def format_summary(s: RunSummary) -> str:
    rec = s.record
    lines = [f"seqclust run {s.run_id}: {rec.status} in {s.seconds:.1f}s"]
    if rec.rows_input is not None:
        lines.append(
            f"  rows: input {rec.rows_input} = clean {rec.rows_clean} + quarantined {rec.rows_quarantined} + duplicates {rec.rows_duplicates}"
            + (f" + outside the window {rec.rows_out_of_window}" if rec.rows_out_of_window else "")
            + (f"  (quarantine reasons: {json.dumps(rec.quarantine_reasons, sort_keys=True)})" if rec.quarantine_reasons else "")
        )
    what = "rows of this run" if s.whole_run_rows else "rows this command wrote"
    lines.append(f"  Delta tables under {s.table_root} ({what}):")
    for t, n in s.table_rows.items():
        lines.append(f"    {t:<18} {n:>10}")
    if rec.stage_seconds:
        lines.append("  stage wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in rec.stage_seconds.items()))
    if rec.encoder_id:
        lines.append(f"  encoder: {rec.encoder_id} ({rec.encoder_path})")
    if s.report:
        lines.append(f"  report: {s.report}")
    if rec.mlflow_run_id:
        lines.append(f"  mlflow: run {rec.mlflow_run_id}")
    if s.k_choice:
        kc = s.k_choice
        stab = f", stability {kc['stability']:.3f} [{kc['stability_low']:.3f}, {kc['stability_high']:.3f}]" if "stability" in kc else ""
        lines.append(f"  k = {kc['k']}{' (uncertain)' if kc.get('uncertain') else ''}: {kc['rule']}{stab}")
    if s.trust:
        lines.append("  how far the segments hold (better: above the reference's 95% interval):")
        lines += [f"    {t}" for t in s.trust]
    if s.metrics:
        methods = [m for m in ("encoder", "bag_of_events", "random") if m in s.metrics]
        first = methods[:1] + (["leaf"] if "silhouette" in s.metrics.get("leaf", {}) else []) + methods[1:]
        names = [
            m
            for m in (
                "silhouette",
                "silhouette_cosine",
                "davies_bouldin",
                "calinski_harabasz",
                "ari",
                "nmi",
                "homogeneity",
                "completeness",
                "v_measure",
                "ari_buyer",
                "nmi_buyer",
                "ari_dominant_category",
                "nmi_dominant_category",
            )
            if any(m in s.metrics[x] for x in methods)
        ]
        n_eval = s.metrics.get("encoder", {}).get("evaluated_users")
        sample = f"; on a hash sample of {int(n_eval)} of {rec.users} users" if n_eval and rec.users and n_eval < rec.users else ""
        lines.append(f"  metrics at k={rec.k}, leaf: the segment tree's leaves (*_buyer, *_dominant_category: vs proxy labels{sample})")
        lines += _method_table(s.metrics, first, names, 24)
        drifted = [m for m in methods if "psi_cluster_shares" in s.metrics[m]]
        if drifted:
            n_cmp = int(s.metrics[drifted[0]]["users_compared"])
            lines.append(f"  drift vs the previous run ({n_cmp} shared users)")
            lines += _method_table(s.metrics, drifted, ("psi_cluster_shares", "js_cluster_shares", "users_changed_cluster"), 24)
        down = sorted({m for x in methods for m in s.metrics[x] if "@" in m})
        more = [m for m in ("leaf", "confident", "fine") if any("@" in x or x.startswith("temporal") for x in s.metrics.get(m, {}))]
        with_fine = methods[:1] + more + methods[1:]
        if down:
            lines.append(
                "  next-session recommendation (history only; segment lists from each method's segments; leaf: the segment tree's "
                "leaves; confident: the top level's confident members; fine: the fine segments)"
            )
            lines += _method_table(s.metrics, with_fine, down, 40)
        conv = [
            m
            for m in ("conversion_auc", "conversion_lift", "return_auc", "return_lift", "temporal_ari", "temporal_same_segment")
            if any(m in s.metrics[x] for x in methods)
        ]
        if conv:
            lines.append(
                "  next-session conversion, return within evaluate.return_days (AUC 0.5 = no information),"
                " and a user's segment, first vs second half of their sessions"
            )
            lines += _method_table(s.metrics, with_fine, conv, 40)
    return "\n".join(lines)


def _method_table(metrics: dict[str, dict[str, float]], methods: Sequence[str], names, width: int) -> list[str]:
    """A metric per line, one column per method (nan where a method lacks it)."""
    out = [" " * (width + 4) + "".join(f"{m:>14}" for m in methods)]
    for n in names:
        out.append(f"    {n:<{width}}" + "".join(f"{metrics[m].get(n, float('nan')):>14.4f}" for m in methods))
    return out
