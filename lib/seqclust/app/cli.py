"""Command line: ``seqclust run|assign|stream|export|generate|<stage>``. Parses arguments, loads config, builds the
session, calls the library. User errors end with one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from seqclust.core.config import presets
from seqclust.core.errors import ConfigError, SeqclustError
from seqclust.core.stages import ABOUT, STAGES

log = logging.getLogger("seqclust")

PRESETS = presets()


def _common(p: argparse.ArgumentParser, stage: bool) -> None:
    p.add_argument(
        "--input", help="events: a file or folder (JSON lines, CSV, Parquet) or a Delta table path; omit for generated demo data"
    )
    p.add_argument(
        "--format", choices=["auto", "parquet", "csv", "json", "delta"], help="source format (default: source.format, auto-detected)"
    )
    p.add_argument("--output", help="root folder of the Delta tables (default: run.output)")
    p.add_argument("--run-id", required=stage, help="run id (letters, digits, _ - .); rerunning an id replaces its rows")
    p.add_argument("--labels", help="known labels per user (user_id, persona) for external agreement")
    p.add_argument(
        "--since",
        help="incremental mode: add the events with ts >= SINCE (ISO-8601, UTC unless zoned) to the run id's tables; "
        "sessions the new events touch are recomputed whole and merged",
    )
    p.add_argument("--until", help="incremental mode: only events with ts < UNTIL (ISO-8601)")
    p.add_argument("--encoder", help="reuse an encoder artifact directory instead of training")
    p.add_argument("--conf", help="environment YAML (e.g. conf/local.yaml); conf/base.yaml beside it is applied first")
    p.add_argument(
        "--preset",
        help=f"source preset: column mapping and formats of a known log ({', '.join(PRESETS)})",
    )
    p.add_argument("--env", help="environment name when --conf is not given (default $SEQCLUST_ENV or local)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set cluster.k=8 (repeatable)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqclust", description="User-behaviour segments from e-commerce event logs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help=f"run every stage: {', '.join(STAGES)}")
    _common(run_p, stage=False)
    run_p.add_argument("--resume", action="store_true", help="skip the stages this run id already completed (needs --run-id)")
    a = sub.add_parser("assign", help="assign users of new data to the segments of an earlier run (its encoder and KMeans, no refit)")
    _common(a, stage=False)
    a.add_argument("--model", required=True, metavar="RUN_ID", help="the run whose encoder and segments to use")
    st = sub.add_parser(
        "stream", help="live segments: assign users to a model run's segments as their sessions close (Structured Streaming)"
    )
    st.add_argument("--model", required=True, metavar="RUN_ID", help="the run whose encoder and segments to use")
    st.add_argument(
        "--input",
        help="a folder the producer drops event files into (JSON lines, CSV, Parquet) or a Delta table "
        "(not with --format kafka: source.kafka names the topic)",
    )
    st.add_argument(
        "--format",
        choices=["auto", "parquet", "csv", "json", "delta", "kafka"],
        help="source format (default: source.format); kafka: --set source.kafka.bootstrap_servers=H:P --set source.kafka.topic=T",
    )
    st.add_argument("--checkpoint", required=True, help="the stream's checkpoint folder (restart from it: nothing is counted twice)")
    how = st.add_mutually_exclusive_group()
    how.add_argument("--trigger-seconds", type=float, help="micro-batch interval (default: stream.trigger_seconds)")
    how.add_argument("--available-now", action="store_true", help="process what is there now, in micro-batches, then stop")
    st.add_argument("--flush", action="store_true", help="at the end, close every open session (the end of the log)")
    st.add_argument("--timeout", type=float, help="stop after this many seconds (default: run until stopped)")
    st.add_argument("--run-id", help="the stream's run id, whose tables it writes (default: live-<model>)")
    st.add_argument("--output", help="root folder of the Delta tables (default: run.output)")
    st.add_argument("--conf", help="environment YAML (e.g. conf/local.yaml); conf/base.yaml beside it is applied first")
    st.add_argument("--preset", help=f"source preset ({', '.join(PRESETS)})")
    st.add_argument("--env", help="environment name when --conf is not given (default $SEQCLUST_ENV or local)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    st.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    for name in STAGES:
        _common(sub.add_parser(name, help=f"run the {name} stage of an existing run id ({ABOUT[name]})"), stage=True)
    g = sub.add_parser("generate", help="write a synthetic event log with planted personas")
    g.add_argument("--out", required=True, help="output folder (events/ and personas/ are written inside)")
    g.add_argument("--users", type=int, required=True)
    g.add_argument("--seed", type=int, default=7)
    g.add_argument("--bad-rate", type=float, default=0.0, help="share of rows made invalid (and as many duplicated)")
    g.add_argument("--format", choices=["parquet", "json", "csv"], default="parquet")
    g.add_argument(
        "--persona-family",
        metavar="NAME",
        help="a generator of the persona benchmark family instead of the default one: interests, dynamics, pace_price, "
        "mixture, real_sessions (needs --data-root), generated (Parquet only; no bad rows)",
    )
    g.add_argument("--data-root", help="folder holding the real logs (e.g. ../shared/data) for --persona-family real_sessions")
    g.add_argument("-v", "--verbose", action="store_true")
    x = sub.add_parser("export", help="write a run's segments as audiences (one per segment) for an ad or CRM tool")
    x.add_argument("--run-id", required=True, help="the run whose segments to export")
    x.add_argument("--format", choices=["csv", "parquet", "delta"], default="csv", help="audience format (default %(default)s)")
    x.add_argument("--out", required=True, help="target folder: absent, empty or an earlier export (it is replaced)")
    x.add_argument("--min-size", type=int, default=50, help="withhold segments with fewer users (default %(default)s)")
    x.add_argument(
        "--level",
        choices=["top", "leaf"],
        default="top",
        help="the segment tree's top level or its leaves (each user in their deepest segment; default %(default)s)",
    )
    x.add_argument("--min-confidence", type=float, help="keep only users at least this sure of their segment (clusters.confidence, 0..1)")
    x.add_argument(
        "--raw-ids", action="store_true", help="export user ids as the run kept them (default: pseudonyms, salt from privacy.salt_env)"
    )
    x.add_argument("--output", help="root folder of the Delta tables (default: run.output)")
    x.add_argument("--conf", help="environment YAML (e.g. conf/local.yaml)")
    x.add_argument("--env", help="environment name when --conf is not given")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    x.add_argument("-v", "--verbose", action="store_true")
    pr = sub.add_parser(
        "promote",
        help="point an alias of the registered segments model (tracking.registered_model) at the version a model run registered",
    )
    pr.add_argument("--run-id", required=True, help="the model run whose registered version the alias should name")
    pr.add_argument("--alias", default="champion", help="the alias (default %(default)s): serve models:/<name>@<alias>")
    pr.add_argument("--output", help="root folder of the Delta tables, under which the local MLflow store lives (default: run.output)")
    pr.add_argument("--conf", help="environment YAML (e.g. conf/local.yaml)")
    pr.add_argument("--env", help="environment name when --conf is not given")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    pr.add_argument("-v", "--verbose", action="store_true")
    w = sub.add_parser("warmup", help="start Spark with Delta once (fetches Delta's jars) and check a Delta round trip")
    w.add_argument("-v", "--verbose", action="store_true")
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "matplotlib", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    if args.output:
        out.append(f"run.output={args.output}")
    if args.format:
        out.append(f"source.format={args.format}")
    if getattr(args, "encoder", None):
        out.append(f"encoder.path={args.encoder}")
    if getattr(args, "model", None):
        out.append(f"cluster.model_run={args.model}")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from seqclust.datasets.generated import write_dataset

    if args.users < 1:
        raise ConfigError("--users: must be >= 1")
    if not 0 <= args.bad_rate < 1:
        raise ConfigError("--bad-rate: must be in [0, 1)")
    if args.persona_family:
        from seqclust.datasets.personas import write_member

        if args.format != "parquet" or args.bad_rate:
            raise ConfigError("--persona-family writes clean Parquet: drop --format/--bad-rate")
        try:
            info = write_member(args.out, args.persona_family, args.users, args.seed, args.data_root)
        except ValueError as e:
            raise ConfigError(f"--persona-family: {e}") from None
        print(
            f"generated {info['events']} events for {info['users']} users ({info['generator']}, {info['planted_k']} planted personas): "
            f"{Path(args.out) / 'events'} (labels: {Path(args.out) / 'personas'})"
        )
        return 0
    r = write_dataset(args.out, args.users, seed=args.seed, bad_rate=args.bad_rate, fmt=args.format)
    print(
        f"generated {r.events} events for {r.users} users in {r.seconds:.1f}s: {Path(args.out) / 'events'} (labels: {Path(args.out) / 'personas'})"
    )
    return 0


def demo_data(output: str, users: int, seed: int, bad_rate: float) -> tuple[str, str]:
    """Generated data for the embedded default, reused while its parameters are unchanged."""
    from seqclust.datasets.generated import write_dataset

    root = Path(output) / "_demo_data" / f"users{users}-seed{seed}-bad{bad_rate:g}"
    if not (root / "_GENERATED.json").exists():
        log.info("no --input: generating demo data (%d users) under %s", users, root)
        write_dataset(root, users, seed=seed, bad_rate=bad_rate)
    return str(root / "events"), str(root / "personas")


def parse_window(since: str | None, until: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Parse --since/--until (ISO-8601; UTC when no zone is given); since must precede until."""

    def one(flag: str, value: str | None) -> dt.datetime | None:
        if value is None:
            return None
        try:
            t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{flag}: {value!r} is not an ISO-8601 date or timestamp (e.g. 2026-11-01 or 2026-11-01T06:00:00Z)") from None
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)

    s, u = one("--since", since), one("--until", until)
    if s and u and s >= u:
        raise ConfigError(f"--since {since} must be before --until {until}")
    return s, u


def cmd_pipeline(args: argparse.Namespace) -> int:
    from seqclust.app import pipeline
    from seqclust.core.config import load_config

    cfg = load_config(args.conf, overrides=_overrides(args), env=args.env, preset=args.preset)
    input_path = args.input or cfg.source.path
    labels_path = args.labels or cfg.labels.path
    if input_path is None and args.command in ("run", "ingest"):
        input_path, gen_labels = demo_data(cfg.run.output, cfg.generate.users, cfg.generate.seed, cfg.generate.bad_rate)
        labels_path = labels_path or gen_labels
    since, until = parse_window(args.since, args.until)
    if (since or until) and not (args.run_id or cfg.run.run_id):
        raise ConfigError("--since/--until add to an existing run id's tables: pass --run-id")
    ctx = pipeline.make_context(cfg, input_path, labels_path, args.run_id, since=since, until=until)
    if args.command in ("run", "train") and not cfg.encoder.path and not getattr(args, "resume", False):
        from seqclust.represent.encoder import require_training_backend

        require_training_backend()  # before Spark starts: a runtime without TensorFlow is told at once
    from seqclust.runtime.spark import get_spark

    spark = get_spark(cfg.spark)
    ctx.store.check_schema(spark)
    if args.command == "assign":
        cfg = pipeline.with_model_run_encoder(spark, cfg)
    stages = STAGES if args.command in ("run", "assign") else (args.command,)
    resume = bool(getattr(args, "resume", False))
    if resume and not (args.run_id or cfg.run.run_id):
        raise ConfigError("--resume needs the --run-id of the run to continue")
    summary = pipeline.run(spark, cfg, ctx, stages, resume=resume)
    print(pipeline.format_summary(summary))
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from seqclust.app import pipeline
    from seqclust.core.config import load_config, validate_run_id
    from seqclust.runtime.spark import get_spark, kafka_package
    from seqclust.serve import stream

    validate_run_id(args.model)
    cfg = load_config(args.conf, overrides=_overrides(args), env=args.env, preset=args.preset)
    if args.trigger_seconds is not None and args.trigger_seconds <= 0:
        raise ConfigError("--trigger-seconds: must be > 0")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout: must be > 0")
    kafka = cfg.source.format == "kafka"
    if kafka and args.input:
        raise ConfigError("stream: --input is for files and Delta tables; a Kafka topic is source.kafka.topic")
    if not kafka and not args.input:
        raise ConfigError("stream: pass --input PATH (a folder the producer drops files into, or a Delta table), or --format kafka")
    ctx = pipeline.make_context(cfg, stream.kafka_input(cfg) if kafka else args.input, None, args.run_id or f"live-{args.model}")
    spark = get_spark(cfg.spark, packages=[kafka_package()] if kafka else ())
    ctx.store.check_schema(spark)
    cfg = pipeline.with_model_run_encoder(spark, cfg)
    r = stream.run(spark, cfg, ctx, args.checkpoint, args.trigger_seconds, args.available_now, args.flush, args.timeout)
    print(
        f"stream {ctx.run_id}: {r.batches} micro-batches, {r.input_rows} input rows, {r.closed_sessions} sessions closed"
        f"{f' ({r.flushed} by the flush)' if args.flush else ''}, {r.users_updated} user updates; "
        f"tables {ctx.tables.live_segments}, {ctx.tables.live_sessions}, {ctx.tables.live_progress} under {ctx.store.root}"
    )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import re

    from seqclust.core.config import load_config, validate_run_id
    from seqclust.runtime.tracking import use_tracking
    from seqclust.serve.mlflow_model import promote

    validate_run_id(args.run_id)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,62}", args.alias):
        raise ConfigError(f"--alias {args.alias!r}: a letter, then letters, digits, _ or - (at most 63)")
    overrides = list(args.set) + ([f"run.output={args.output}"] if args.output else [])
    cfg = load_config(args.conf, overrides=overrides, env=args.env)
    name = cfg.tracking.registered_model
    if not name:
        raise ConfigError("tracking.registered_model is null: no model is registered to promote")
    use_tracking(cfg)
    version = promote(name, args.run_id, args.alias)
    print(f"{name}@{args.alias} -> version {version} (run {args.run_id}); serve it: mlflow models serve -m models:/{name}@{args.alias}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from seqclust.core.config import load_config, validate_run_id
    from seqclust.runtime.spark import get_spark
    from seqclust.serve.export import export

    validate_run_id(args.run_id)
    overrides = list(args.set) + ([f"run.output={args.output}"] if args.output else [])
    cfg = load_config(args.conf, overrides=overrides, env=args.env)
    spark = get_spark(cfg.spark)
    res = export(
        spark,
        cfg,
        args.run_id,
        args.format,
        args.out,
        min_size=args.min_size,
        raw_ids=args.raw_ids,
        level=args.level,
        min_confidence=args.min_confidence,
    )
    print(res.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.verbose:  # TensorFlow, the JVM and BLAS on the console too (else: core.console.native_log())
        os.environ.setdefault("SEQCLUST_NATIVE_LOG", "-")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "promote":
            return cmd_promote(args)
        if args.command == "stream":
            return cmd_stream(args)
        if args.command == "warmup":
            import tempfile

            from seqclust.runtime.spark import delta_package, warm_up

            with tempfile.TemporaryDirectory() as d:
                print(f"Spark {warm_up(d)} with {delta_package()}: Delta round trip ok")
            return 0
        return cmd_pipeline(args)
    except SeqclustError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"seqclust: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("seqclust: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"seqclust: unexpected error ({type(e).__name__}): {first[:500]} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
