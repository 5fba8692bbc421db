"""What the Databricks notebooks (and the scheduler) share: turning widget / task values into the
CLI's arguments, and the run id derived from a run date, so a retried run replaces its own rows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from seqclust.core.config import validate_run_id
from seqclust.core.errors import ConfigError
from seqclust.core.stages import STAGES

COMMANDS = ("run", *STAGES, "assign")

# widget name -> (default, label); the notebooks create exactly these
WIDGETS: dict[str, tuple[str, str]] = {
    "command": ("run", "run, or one stage: ingest ... evaluate, assign"),
    "conf": ("../conf/databricks.yaml", "Config file (relative to the notebook)"),
    "run_date": ("", "Run date YYYY-MM-DD (default: today, UTC)"),
    "run_id": ("", "Run id (default: the run date)"),
    "input": ("", "Raw events; {run_date} is replaced (default: source.path)"),
    "labels": ("", "Known labels, optional"),
    "output": ("", "Artifacts root, e.g. a UC volume (default: run.output)"),
    "catalog": ("", "Unity Catalog catalog (default: tables.catalog)"),
    "schema": ("", "Schema of the tables (default: tables.schema)"),
    "model_run": ("", "assign: the run whose model to use"),
    "overrides": ("", "More settings: key=value, one per line or ';'-separated"),
}


def run_id_for(run_date: str | None, today: dt.date | None = None) -> str:
    """The run id of a scheduled run: its date (``YYYY-MM-DD``), so that a retry or a rerun of
    the same logical date replaces that run's rows instead of adding a new run."""
    if not run_date:
        return (today or dt.datetime.now(dt.timezone.utc).date()).isoformat()
    try:
        d = dt.date.fromisoformat(run_date.strip()[:10])
    except ValueError:
        raise ConfigError(f"run_date: {run_date!r} is not a date (YYYY-MM-DD)") from None
    return d.isoformat()


def cli_args(get: Callable[[str], str | None], today: dt.date | None = None) -> list[str]:
    """The ``seqclust`` command line for widget values (``get(name)`` -> value or ''/None)."""

    def val(name: str) -> str:
        return (get(name) or "").strip()

    command = val("command") or "run"
    if command not in COMMANDS:
        raise ConfigError(f"command: {command!r} is not one of {', '.join(COMMANDS)}")
    run_date = run_id_for(val("run_date"), today)
    run_id = validate_run_id(val("run_id") or run_date)
    args = [command, "--run-id", run_id]
    if val("conf"):
        args += ["--conf", val("conf")]
    if val("input"):
        args += ["--input", val("input").replace("{run_date}", run_date)]
    for name in ("labels", "output"):
        if val(name):
            args += [f"--{name}", val(name)]
    if command == "assign":
        if not val("model_run"):
            raise ConfigError("command assign needs the model_run widget (the run whose model to use)")
        args += ["--model", val("model_run")]
    for name in ("catalog", "schema"):
        if val(name):
            args += ["--set", f"tables.{name}={val(name)}"]
    for item in _split(val("overrides")):
        if "=" not in item:
            raise ConfigError(f"overrides: {item!r} is not key=value")
        args += ["--set", item]
    return args


def _split(text: str) -> Sequence[str]:
    return [p.strip() for line in text.splitlines() for p in line.split(";") if p.strip()]


def create_widgets(dbutils, defaults: dict[str, str] | None = None) -> None:  # noqa: ANN001 - Databricks' dbutils
    """Create the notebook's text widgets (idempotent on Databricks)."""
    for name, (default, label) in WIDGETS.items():
        dbutils.widgets.text(name, (defaults or {}).get(name, default), label)


def run_notebook(dbutils) -> str:  # noqa: ANN001
    """Run the command the widgets describe with the notebook's session; return the run id.
    Raises RuntimeError (the task fails) on a non-zero exit."""
    from seqclust.app.cli import main

    args = cli_args(dbutils.widgets.get)
    print("seqclust " + " ".join(args))
    code = main(args)
    if code != 0:
        raise RuntimeError(f"seqclust {args[0]} failed with exit code {code}; see the error above")
    return args[args.index("--run-id") + 1]


def open_run(get: Callable[[str], str | None]):  # -> tuple[PipelineConfig, TableStore, str]
    """The configuration, table store and run id the widgets describe (to read a run's tables)."""
    from seqclust.core.config import load_config
    from seqclust.runtime.store import table_store

    args = cli_args(get)
    conf = args[args.index("--conf") + 1] if "--conf" in args else None
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    if "--output" in args:
        overrides.append(f"run.output={args[args.index('--output') + 1]}")
    cfg = load_config(conf, overrides=overrides)
    return cfg, table_store(cfg), args[args.index("--run-id") + 1]
