"""The package's shape: no import cycles (function-level imports included), every table's
schema declared once in seqclust.core.tables and used by its writer."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from seqclust.core import tables
from seqclust.core.config import TablesConfig

PKG = Path(__file__).resolve().parents[1] / "lib" / "seqclust"


def _module(path: Path) -> str:
    """``lib/seqclust/segment/cluster.py`` -> ``segment.cluster``."""
    return ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """seqclust modules imported anywhere in ``path`` — at module level, in functions and in
    ``if TYPE_CHECKING:`` blocks (a type-only import is a dependency too) — as dotted names below
    the package (``core.config``)."""
    known = _modules()
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "seqclust":
            base = node.module.partition(".")[2]
            subs = {f"{base}.{a.name}".lstrip(".") for a in node.names}
            out |= {s for s in subs if s in known} or ({base} if base in known else set())
        elif isinstance(node, ast.Import):
            out |= {a.name.partition(".")[2] for a in node.names if a.name.partition(".")[2] in known}
    return out - {_module(path), ""}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_package_has_no_import_cycles():
    graph = {m: _imports(p) for m, p in _modules().items()}
    # the parser sees function-level imports and both import forms
    assert len(graph) > 30 and graph["evaluate.stage"] >= {"evaluate.downstream", "evaluate.baseline", "core.tables"}
    assert "represent.behaviour" in graph["segment.cluster"]
    assert _cycles(graph) == []


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The sub-package graph: ``core`` -> ``runtime`` when a module of one imports one of the other."""
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        a = m.split(".")[0]
        out.setdefault(a, set()).update(b for b in (d.split(".")[0] for d in deps) if b != a)
    return out


def test_the_sub_packages_have_no_import_cycles():
    """The folders are layers: ``core`` imports no other sub-package, ``runtime`` only ``core``,
    and so on up to ``app``; a cycle between two folders means one of them holds the wrong module."""
    graph = _packages({m: _imports(p) for m, p in _modules().items()})
    assert graph["core"] == set(), f"core imports {sorted(graph['core'])}"
    assert _cycles(graph) == []


def _private_uses(path: Path, me: str | None = None) -> list[str]:
    """Private names (``_x``) of another sub-package that ``path`` (in sub-package ``me``)
    imports or calls through a module it imported."""
    me = me or _module(path).split(".")[0]
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seqclust."):
            pkg = node.module.split(".")[1]
            for a in node.names:
                if pkg != me and a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{node.module}.{a.name}")
                aliases[a.asname or a.name] = f"{node.module}.{a.name}".split(".")[1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
            pkg = aliases.get(node.value.id)
            if pkg is not None and pkg != me and not node.attr.startswith("__"):
                out.append(f"{node.value.id}.{node.attr}")
    return out


def test_no_private_name_is_used_across_sub_packages():
    found = {m: u for m, p in _modules().items() if (u := _private_uses(p))}
    assert found == {}


def test_the_private_use_finder_finds_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from seqclust.represent import features\nfrom seqclust.core.config import _build\nfeatures._ids(1)\n")
    assert sorted(_private_uses(probe, "serve")) == ["features._ids", "seqclust.core.config._build"]
    assert _private_uses(probe, "represent") == ["seqclust.core.config._build"]  # its own package's are its own


def test_type_only_imports_count():
    # report.explain names RunContext and the config classes in annotations only
    assert {"runtime.context", "core.config"} <= _imports(PKG / "report" / "explain.py")


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_every_configured_table_has_one_schema():
    keys = {f.name for f in dataclasses.fields(TablesConfig) if f.name not in ("catalog", "schema")}
    assert set(tables.TABLES) == keys
    # the schemas are defined in seqclust.core.tables and nowhere else in the package
    for p in PKG.rglob("*.py"):
        if p != PKG / "core" / "tables.py":
            text = p.read_text()
            for name in ("RUNS_SCHEMA", "METRICS_SCHEMA", "PROFILE_SCHEMA", "class RunRecord", "class MetricRow"):
                assert name not in text, (p.name, name)


def test_runs_schema_derives_from_the_run_record():
    fields = [f.name for f in dataclasses.fields(tables.RunRecord)]
    assert tables.RUNS.fieldNames() == fields
    types = {f.name: f.dataType.simpleString() for f in tables.RUNS.fields}
    assert types["k"] == "int" and types["rows_input"] == "bigint" and types["started_at"] == "timestamp"
    assert types["quarantine_reasons"] == "map<string,bigint>" and types["stages_completed"] == "array<string>"
    rec = tables.RunRecord(status="succeeded", k=3, stage_seconds={"ingest": 1.5})
    assert tables.RunRecord.from_row(dict(zip(fields, rec.row()))) == rec


def test_the_sessionizer_arrow_schema_derives_from_the_sessions_table():
    from seqclust.sessionize.arrow_engine import OUT_SCHEMA

    assert OUT_SCHEMA.names == [*tables.SESSIONS.fieldNames(), "reason"]
    assert str(OUT_SCHEMA.field("start_ts").type) == "timestamp[us, tz=UTC]"
    assert str(OUT_SCHEMA.field("event_counts").type) == "map<string, int32>"


def test_a_metric_row_is_typed():
    r = tables.MetricRow(method="encoder", family="internal", metric="silhouette", value=float("nan"), details={"b": 1, "a": 2})
    assert r.row() == ("encoder", "user", None, "internal", "silhouette", None, None, None, '{"a": 2, "b": 1}')
    assert r.with_k(4).k == 4
    with pytest.raises(TypeError, match="details must be a mapping"):
        tables.MetricRow(method="encoder", family="internal", metric="m", value=1.0, details='{"a": 1}')
    with pytest.raises(TypeError, match="family must be a non-empty string"):
        tables.MetricRow(method="encoder", family="", metric="m", value=1.0)
    with pytest.raises(TypeError, match="rows are MetricRow, not dict"):
        tables.metric_rows_frame(None, [{"method": "encoder"}], ["internal"])
    with pytest.raises(ValueError, match="family internal written with families"):
        tables.metric_rows_frame(None, [r], ["sweep"])


def test_conform_names_what_breaks_the_contract(spark):
    from seqclust.core.errors import SeqclustError

    good = spark.createDataFrame(
        [(1, "fine", [0.5], 3, None)], "cluster_id int, method string, centroid array<double>, size bigint, segment_path string"
    )
    out = tables.conform(good.select("size", "centroid", "method", "segment_path", "cluster_id"), "centroids")
    assert out.columns == ["cluster_id", "method", "centroid", "size", "segment_path"]
    bad = good.withColumn("size", good["size"].cast("double")).withColumn("extra", good["method"]).drop("method")
    with pytest.raises(SeqclustError) as e:
        tables.conform(bad, "centroids")
    msg = str(e.value)
    assert "table centroids" in msg and "method missing" in msg and "extra not in the contract" in msg
    assert "size is double, the contract says bigint" in msg


MAX_LINES = 120


def test_no_function_or_class_is_over_120_lines():
    long_functions, long_classes = [], []
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            n = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_LINES:
                long_functions.append(f"{p.name}:{node.name} ({n} lines)")
            if isinstance(node, ast.ClassDef) and n > MAX_LINES:
                long_classes.append(f"{p.name}:{node.name} ({n} lines)")
    assert long_functions == [], f"functions over {MAX_LINES} lines: " + ", ".join(long_functions)
    assert long_classes == [], f"classes over {MAX_LINES} lines: " + ", ".join(long_classes)
