"""The whole pipeline on a small generated dataset, through the CLI, twice with one run id."""

from pathlib import Path

import numpy as np
import pytest

from seqclust.app.cli import main
from seqclust.core import tables
from seqclust.datasets.generated import write_dataset

REPO = Path(__file__).resolve().parents[1]

CONTRACT = {
    "quarantine": {"run_id", "source", "source_file", "raw", "reason", "ingested_at"},
    "events": {"run_id", "event_id", "user_id", "ts", "event_type", "item_id", "category_id", "price"},
    "sessions": {"run_id", "session_id", "user_id", "start_ts", "end_ts", "n_events", "event_counts", "tokens", "categories", "items"},
    "embeddings": {"run_id", "entity_type", "entity_id", "embedding", "encoder_id"},
    "clusters": {"run_id", "entity_id", "cluster_id", "distance_to_centroid", "granularity", "segment_path", "confidence"},
    "centroids": {"run_id", "cluster_id", "centroid", "size"},
    "cluster_profiles": {
        "run_id",
        "cluster_id",
        "size",
        "share",
        "event_mix",
        "top_categories",
        "conversion_rate",
        "median_session_events",
        "price_index",
        "description",
    },
    "session_quarantine": {"run_id", "session_id", "user_id", "start_ts", "end_ts", "n_events", "reason"},
    "metrics": {"run_id", "method", "k", "metric", "value", "ci_low", "ci_high", "details"},
    "runs": {
        "run_id",
        "status",
        "started_at",
        "finished_at",
        "config_json",
        "config_hash",
        "encoder_id",
        "rows_input",
        "rows_clean",
        "rows_quarantined",
        "rows_duplicates",
        "stage_seconds",
    },
}

SMALL = [
    "encoder.epochs=6",
    "encoder.batch_size=64",
    "encoder.train_sample=3000",
    "encoder.embedding_dim=16",
    "encoder.hidden=32",
    "cluster.k_min=5",
    "cluster.k_max=8",
    "cluster.stability_runs=2",
    "cluster.n_init=2",
    "evaluate.bootstrap=50",
    "spark.shuffle_partitions=2",
    # a segment tree on 350 users: every test passes (small segments, no thresholds), so the
    # run writes, evaluates and reuses a real tree
    "cluster.split_max_depth=2",
    "cluster.split_min_users=40",
    "cluster.split_min_child_users=10",
    "cluster.split_min_gap=0",
    "cluster.split_min_stability=0",
    "cluster.split_min_temporal=-1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    write_dataset(root, users=350, seed=11, bad_rate=0.01)
    return root


def _args(data, out, run_id, labels=True):
    args = ["run", "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events"), "--output", str(out), "--run-id", run_id]
    if labels:
        args += ["--labels", str(data / "personas")]
    return args + [x for s in SMALL for x in ("--set", s)]


def _run(data, out, run_id, capsys):
    code = main(_args(data, out, run_id))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


@pytest.fixture(scope="module")
def e2e_out(spark, data, tmp_path_factory):
    """One full run (module-wide): the main test checks it, the report test renders it."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("e2e") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(_args(data, out, "e2e-1"))
    assert code == 0
    return out, buf.getvalue()


def test_pipeline_end_to_end_and_idempotent_rerun(spark, data, e2e_out, capsys):
    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    out, summary = e2e_out
    assert "e2e-1: succeeded" in summary and "ari" in summary
    # the verdicts in sentences: the top level against bag-of-events and random on each job measured
    assert "how far the segments hold" in summary and "    top level: " in summary and "conversion" in summary

    def counts():
        return {t: spark.read.format("delta").load(str(out / t)).where(F.col("run_id") == "e2e-1").count() for t in CONTRACT}

    first = counts()
    for table, cols in CONTRACT.items():
        df = spark.read.format("delta").load(str(out / table))
        assert cols <= set(df.columns), (table, cols - set(df.columns))
        # and the types as seqclust.core.tables declares them (conform raises naming any difference)
        assert tables.conform(df, table).columns[:-1] == tables.TABLES[table].schema.fieldNames(), table
        # a real Delta table: another Delta reader agrees on the row count
        assert DeltaTable(str(out / table)).to_pyarrow_table().num_rows == df.count(), table
    for t in ("sessions", "embeddings", "clusters", "metrics", "runs", "events", "quarantine"):
        assert first[t] > 0, t

    runs = spark.read.format("delta").load(str(out / "runs")).first()
    assert runs["status"] == "succeeded"
    assert runs["rows_input"] == runs["rows_clean"] + runs["rows_quarantined"] + runs["rows_duplicates"]
    assert runs["rows_duplicates"] > 0 and runs["rows_quarantined"] > 0
    assert set(runs["stage_seconds"]) == {"ingest", "sessionize", "train", "embed", "cluster", "evaluate"}

    both = spark.read.format("delta").load(str(out / "clusters"))
    clusters = both.where("granularity = 'coarse'")
    assert dict(clusters.dtypes)["entity_id"] == "string" and dict(clusters.dtypes)["cluster_id"] == "int"
    assert clusters.count() == clusters.select("entity_id").distinct().count() == 350
    # fine segments for recommendation fill: every user once more, at most one segment per 20 users
    fine = both.where("granularity = 'fine'")
    assert fine.count() == fine.select("entity_id").distinct().count() == 350
    assert runs["k"] < fine.select("cluster_id").distinct().count() <= 350 // 20
    assert clusters.where("distance_to_centroid < 0").count() == 0
    # the segment tree: every user once among the leaves, under their top segment
    leaf = both.where("granularity = 'leaf'")
    assert leaf.count() == leaf.select("entity_id").distinct().count() == 350
    assert clusters.where("segment_path != CAST(cluster_id AS STRING)").count() == 0
    pairs = clusters.select("entity_id", F.col("segment_path").alias("top")).join(leaf, "entity_id").collect()
    assert all(r["segment_path"] == r["top"] or r["segment_path"].startswith(r["top"] + ".") for r in pairs)
    assert any("." in r["segment_path"] for r in pairs)  # the forced tests split some segments
    id_path = {(r["cluster_id"], r["segment_path"]) for r in pairs}
    assert len(id_path) == len({i for i, _ in id_path}) == len({p for _, p in id_path})  # leaf ids unique among the leaves
    tree = spark.read.format("delta").load(str(out / "centroids")).where("method = 'tree'").collect()
    nodes = {r["segment_path"]: r["size"] for r in tree}
    assert {p for _, p in id_path} <= set(nodes)
    top_sizes = {str(r["cluster_id"]): r["count"] for r in clusters.groupBy("cluster_id").count().collect()}
    assert {p: n for p, n in nodes.items() if "." not in p} == top_sizes
    # a confidence per user at every level, never surer at the leaf than at the top
    conf = both.groupBy("entity_id").pivot("granularity", ["coarse", "leaf", "fine"]).agg(F.first("confidence")).collect()
    assert len(conf) == 350 and all(0 <= r[g] <= 1 for r in conf for g in ("coarse", "leaf", "fine"))
    assert all(r["leaf"] <= r["coarse"] + 1e-9 for r in conf) and len({round(r["coarse"], 6) for r in conf}) > 20
    profiles = spark.read.format("delta").load(str(out / "cluster_profiles"))
    assert profiles.where("granularity = 'leaf'").count() == len(id_path)
    assert profiles.where("granularity = 'coarse'").count() == runs["k"]

    m = {
        (r["method"], r["metric"]): r["value"]
        for r in spark.read.format("delta").load(str(out / "metrics")).where("family != 'sweep'").collect()
    }
    for method in ("encoder", "leaf", "bag_of_events", "random"):
        for metric in ("silhouette", "davies_bouldin", "calinski_harabasz", "ari", "nmi", "homogeneity", "completeness", "v_measure"):
            assert (method, metric) in m, (method, metric)
    for metric in ("split", "split_gap", "split_silhouette", "split_null_silhouette", "split_stability", "split_temporal_ari"):
        assert ("leaf", metric) in m, metric
    shares = spark.read.format("delta").load(str(out / "metrics")).where("family = 'confidence' AND metric = 'confident_share'")
    overall = {r["method"]: r["value"] for r in shares.collect() if '"segment"' not in r["details"]}
    assert set(overall) == {"encoder", "leaf", "fine"} and overall["leaf"] <= overall["encoder"]
    sure = sum(1 for r in conf if r["coarse"] >= 0.2)
    assert overall["encoder"] == pytest.approx(sure / 350)
    # 350 users and a few epochs: far from the full-size figure, far above chance
    assert m[("encoder", "ari")] > m[("random", "ari")] + 0.3
    assert m[("encoder", "silhouette")] > m[("random", "silhouette")]
    assert m[("bag_of_events", "ari")] > m[("random", "ari")]
    # next-session recommendation, every strategy beside the random segmentation, with CIs
    down = spark.read.format("delta").load(str(out / "metrics")).where("family = 'downstream'")
    for method in ("encoder", "bag_of_events", "random"):
        for strat in ("global", "cluster", "own", "own_cluster_fill", "own_global_fill"):
            assert (method, f"hitrate@10_categories_{strat}") in m and (method, f"ndcg@10_categories_{strat}") in m
    assert down.where("NOT (ci_low <= value AND value <= ci_high)").count() == 0
    assert m[("encoder", "hitrate@10_categories_own_global_fill")] >= m[("encoder", "hitrate@10_categories_own")]
    # who comes back: measured beside random segments exactly when the log holds enough returners
    # and stayers after the cutoff (the guard, recomputed here from the run's sessions; the
    # family's figures are tested in tests/test_downstream.py on a log that has them)
    from seqclust.evaluate.downstream import MIN_OUTCOME_USERS, return_split

    split = return_split(spark.read.format("delta").load(str(out / "sessions")).where("run_id = 'e2e-1' AND is_modelled"), 7.0)
    measurable = False
    if split is not None and split[1].limit(1).count():
        o = split[2].agg(F.sum("y").alias("p"), F.count("*").alias("n")).first()
        pos, neg = int(o["p"] or 0), int(o["n"]) - int(o["p"] or 0)
        measurable = min(pos, neg) >= max(MIN_OUTCOME_USERS, int(0.01 * (pos + neg)))
    for key in (("encoder", "return_auc"), ("random", "return_auc"), ("encoder", "return_lift")):
        assert (key in m) == measurable, (key, measurable)

    def snapshot():
        emb = {
            r["entity_id"]: r["embedding"]
            for r in spark.read.format("delta").load(str(out / "embeddings")).where("entity_type = 'user'").collect()
        }
        cl = {(r["entity_id"], r["granularity"]): r["cluster_id"] for r in spark.read.format("delta").load(str(out / "clusters")).collect()}
        sess = sorted(r["session_id"] for r in spark.read.format("delta").load(str(out / "sessions")).collect())
        return emb, cl, sess, spark.read.format("delta").load(str(out / "runs")).first()["encoder_id"]

    emb1, cl1, sess1, enc1 = snapshot()
    assert runs["input_fingerprint"] and runs["input_files"] == 4

    # rerun with the same id: rows replaced, never duplicated; and the same input and seeds
    # give the same sessions, encoder weights (content hash), embeddings and clusters
    _run(data, out, "e2e-1", capsys)
    assert counts() == first
    assert spark.read.format("delta").load(str(out / "runs")).count() == 1
    emb2, cl2, sess2, enc2 = snapshot()
    assert sess1 == sess2 and enc1 == enc2 and cl1 == cl2
    assert max(float(np.max(np.abs(np.array(emb1[u]) - np.array(emb2[u])))) for u in emb1) <= 1e-6


def test_bad_input_path_exits_with_one_line(tmp_path, capsys):
    code = main(
        [
            "run",
            "--conf",
            str(REPO / "conf" / "local.yaml"),
            "--input",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
            "--run-id",
            "bad1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("seqclust: error:") and "path does not exist" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_bad_set_key_exits_with_one_line(tmp_path, capsys):
    code = main(["run", "--conf", str(REPO / "conf" / "local.yaml"), "--set", "cluster.kk=3", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["seqclust: error: cluster.kk: unknown config key (--set)"]


def test_k_larger_than_users_is_a_clear_error(spark, e2e_out, tmp_path, capsys):
    """The cluster stage alone (as a scheduler task) on a copy of e2e-1's tables."""
    import shutil

    out = tmp_path / "o"
    shutil.copytree(e2e_out[0], out)
    args = ["cluster", "--run-id", "e2e-1", "--conf", str(REPO / "conf" / "local.yaml"), "--output", str(out), "--set", "cluster.k=5000"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "cluster.k: 5000 is not below the number of users (350)" in err[-1]
    runs = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'e2e-1'").first()
    assert runs["status"] == "failed" and runs["error"].startswith("cluster:")


def test_stage_jobs_reuse_an_encoder_on_new_data_and_refuse_a_foreign_one(spark, e2e_out, tmp_path, capsys, caplog):
    """Stages run one by one (as scheduler tasks do) on new data with the encoder and the
    segments of the module's full run (e2e-1), beside it in the same tables."""
    import pandas as pd

    out = e2e_out[0]
    art = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'e2e-1'").first()["encoder_path"]

    new = tmp_path / "new"
    write_dataset(new, users=40, seed=99)

    # new users assigned to e2e-1's segments (its encoder and KMeans, no refit), with drift
    conf = ["--conf", str(REPO / "conf" / "local.yaml"), "--output", str(out), "--set", "evaluate.downstream=false"]
    assert main(["assign", "--model", "e2e-1", "--run-id", "assign-1", "--input", str(new / "events"), *conf]) == 0, (
        capsys.readouterr().err[-2000:]
    )
    assert "drift vs the previous run" in capsys.readouterr().out
    k_model = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'e2e-1'").first()["k"]
    assigned = spark.read.format("delta").load(str(out / "clusters")).where("run_id = 'assign-1' AND granularity = 'coarse'")
    assert assigned.count() == 40 and assigned.agg({"cluster_id": "max"}).first()[0] < k_model
    # ... and down e2e-1's segment tree: each new user at the leaf the model's tree gives them
    from seqclust.segment.hierarchy import Tree

    tree = Tree.from_rows(
        [
            (r["segment_path"], list(r["centroid"]))
            for r in spark.read.format("delta").load(str(out / "centroids")).where("run_id = 'e2e-1' AND method = 'tree'").collect()
        ]
    )
    users = spark.read.format("delta").load(str(out / "embeddings")).where("run_id = 'assign-1' AND entity_type = 'user'")
    vec = {r["entity_id"]: list(r["embedding"]) for r in users.collect()}
    top = {r["entity_id"]: r["cluster_id"] for r in assigned.collect()}
    leaves = spark.read.format("delta").load(str(out / "clusters")).where("run_id = 'assign-1' AND granularity = 'leaf'")
    got = {r["entity_id"]: r["segment_path"] for r in leaves.collect()}
    ids = sorted(vec)
    node, _, _, leaf_conf = tree.place(np.array([vec[u] for u in ids]), np.array([top[u] for u in ids]))
    assert len(got) == 40 and [got[u] for u in ids] == [tree.paths[i] for i in node]
    got_conf = {r["entity_id"]: r["confidence"] for r in leaves.collect()}
    assert np.allclose([got_conf[u] for u in ids], leaf_conf)
    rec = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'assign-1'").first()
    assert rec["status"] == "succeeded" and rec["encoder_id"] == Path(art).name
    drift_rows = spark.read.format("delta").load(str(out / "metrics")).where("run_id = 'assign-1' AND family = 'drift'").collect()
    # the encoder's drift stands beside both references, each matched by user overlap
    by_method = {(r["method"], r["metric"]): r for r in drift_rows}
    for method in ("random", "bag_of_events"):
        ref = by_method[(method, "users_changed_cluster")]
        assert 0 <= ref["value"] <= 1 and '"alignment": "user_overlap"' in ref["details"]
        assert by_method[(method, "users_compared")]["value"] == 40
    drift = {r["metric"]: (r["value"], r["details"]) for r in drift_rows if r["method"] == "encoder"}
    assert '"previous_run": "e2e-1"' in drift["psi_cluster_shares"][1] and '"alignment": "same_model"' in drift["psi_cluster_shares"][1]
    assert drift["psi_cluster_shares"][0] >= 0 and 0 <= drift["js_cluster_shares"][0] <= 1
    assert drift["users_compared"][0] == 40  # the generator names users u0, u1, ... in both datasets
    assert 0 <= drift["users_changed_cluster"][0] <= 1
    capsys.readouterr()
    assert main(["assign", "--model", "nosuchrun", "--run-id", "assign-2", "--input", str(new / "events"), *conf]) == 2
    assert "--model nosuchrun: no such run" in capsys.readouterr().err
    base = ["--conf", str(REPO / "conf" / "local.yaml"), "--output", str(out), "--input", str(new / "events"), "--set", "cluster.k=3"]
    base += ["--set", "evaluate.downstream=false"]  # the main test covers it
    for stage in ("ingest", "sessionize", "train", "embed"):
        assert main([stage, "--run-id", "reuse-1", "--encoder", art, *base]) == 0, capsys.readouterr().err[-2000:]
    emb = spark.read.format("delta").load(str(out / "embeddings")).where("run_id = 'reuse-1' AND entity_type = 'user'")
    assert emb.count() == 40
    assert {r["encoder_id"] for r in emb.select("encoder_id").distinct().collect()} == {Path(art).name}
    rec = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'reuse-1'").first()
    assert rec["stages_completed"] == ["ingest", "sessionize", "train", "embed"] and rec["encoder_id"] == Path(art).name
    assert rec["status"] == "running"

    # resume: only the stages not yet completed run; a changed config is refused
    capsys.readouterr()
    assert main(["run", "--resume", "--run-id", "reuse-1", "--encoder", art, *base, "--set", "run.seed=5"]) == 2
    assert "was started with another configuration" in capsys.readouterr().err
    assert main(["run", "--resume", "--run-id", "reuse-1", "--encoder", art, *base]) == 0, capsys.readouterr().err[-2000:]
    done = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'reuse-1'").first()
    assert done["status"] == "succeeded"
    assert done["stages_completed"] == ["ingest", "sessionize", "train", "embed", "cluster", "evaluate"]
    assert done["stage_seconds"]["ingest"] == rec["stage_seconds"]["ingest"]  # not run again
    assert spark.read.format("delta").load(str(out / "clusters")).where("run_id = 'reuse-1' AND granularity = 'coarse'").count() == 40

    # labels that match none of the users: the evaluation still runs, says so, and records 0
    nobody = tmp_path / "nobody.csv"
    pd.DataFrame({"user_id": ["nobody-1", "nobody-2"], "persona": ["a", "b"]}).to_csv(nobody, index=False)
    capsys.readouterr()
    assert main(["evaluate", "--run-id", "reuse-1", "--labels", str(nobody), *base]) == 0
    assert "match none of the clustered users; external metrics skipped" in caplog.text
    ext = {
        r["metric"]: r["value"]
        for r in spark.read.format("delta").load(str(out / "metrics")).where("run_id = 'reuse-1' AND family = 'external'").collect()
    }
    assert ext == {"labelled_users": 0.0}

    # a catalogue the encoder never saw: refused with one line, not embedded as all-OOV noise
    foreign = tmp_path / "foreign.csv"
    pd.DataFrame(
        {
            "user_id": [f"x{i % 5}" for i in range(50)],
            "ts": [f"2026-10-01T10:{i:02d}:00Z" for i in range(50)],
            "event_type": "view",
            "category_id": [f"zz{i}" for i in range(50)],
        }
    ).to_csv(foreign, index=False)
    base = [
        "--conf",
        str(REPO / "conf" / "local.yaml"),
        "--output",
        str(out),
        "--input",
        str(foreign),
        "--set",
        "source.columns.item_id=null",
        "--set",
        "source.columns.price=null",
        "--set",
        "source.columns.event_id=null",
    ]
    capsys.readouterr()
    code = main(["run", "--run-id", "foreign-1", "--encoder", art, *base])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "does not fit this data: 100% of its tokens are outside the encoder's vocabulary" in err[-1]


def test_report_renders_in_headless_chromium(e2e_out, tmp_path):
    """One self-contained file: every chart embedded, decodable and not blank, with a caption;
    in Chromium every image decodes, and at 800 px the page does not scroll sideways."""
    import base64
    import io
    import re
    import shutil
    import subprocess

    from PIL import Image

    out, summary = e2e_out
    report = out / "_artifacts" / "runs" / "e2e-1" / "report.html"
    assert f"report: {report}" in summary
    text = report.read_text()
    for section in ("Internal indices", "Agreement with known labels", "Next-session recommendation", "Segments"):
        assert section in text, section
    for section in ("The map of users", "What sets each segment apart", "Typical journeys", "How k was chosen"):
        assert section in text, section
    # the first screen: the verdict (segments, who they are, how sure, how far they hold) before the run record
    assert text.index("<h2>Verdict</h2>") < text.index("<h2>The run</h2>") < text.index("Internal indices")
    verdict = text[text.index("<h2>Verdict</h2>") : text.index("<h2>The run</h2>")]
    assert "who they are" in verdict and "confident" in verdict and "top level: " in verdict
    # the forced segment tree: its tests, a heatmap per split, the map by leaf, journeys per leaf
    for section in ("The segment tree", "Inside segment ", "map of users by leaf", "Typical journeys per leaf"):
        assert section in text, section
    assert "not drawn" not in text  # no picture failed
    assert not list(report.parent.glob("*.png"))  # nothing beside the file
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    n_img = text.count("<img ")
    assert len(pngs) == n_img >= 5 and text.count("<figcaption>") == n_img
    for b64 in pngs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert im.size[0] >= 400 and colours is not None and len(colours) > 50
    browser = next((b for b in (shutil.which(x) for x in ("chromium", "chromium-browser", "google-chrome")) if b), None)
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; .ci/run installs it); the HTML was checked above")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    for width in (1400, 800):
        dom = subprocess.run(
            [*flags, f"--window-size={width},2000", "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180
        )
        # the page's own script counts images the browser decoded, after the load event, and
        # compares the page's width with the window's
        assert f'id="img-check">{n_img}/{n_img}<' in dom.stdout, dom.stderr[-1500:]
        assert f'id="scroll-check">fits {width}<' in dom.stdout, re.findall(r'id="scroll-check">[^<]*', dom.stdout)
        shot = tmp_path / f"report-{width}.png"
        subprocess.run([*flags, f"--window-size={width},2400", f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=180)
        with Image.open(shot) as im:
            assert im.size == (width, 2400)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # tables, text and charts, not a blank page


def test_a_view_only_clickstream_without_category_or_price_runs_to_the_end(spark, tmp_path, capfd):
    """One event type, items only (a DIGINETICA-like log): every bag-of-events vector is the
    same, which made MLlib's block solver fail in evaluate; the behaviour tokens use the items.
    The case is detected before fitting: no executor error reaches the console (capfd: the
    JVM's own stderr too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    n = 4000
    user = rng.integers(0, 200, n)
    ts = np.sort(rng.integers(0, 86400 * 7, n)) + 1_790_000_000
    (tmp_path / "ev").mkdir()
    pq.write_table(
        pa.table({"visitor": [f"v{u}" for u in user], "t": ts, "item": [f"i{int(x)}" for x in rng.zipf(1.5, n) % 500]}),
        tmp_path / "ev" / "part-0.parquet",
    )
    mapping = ["source.columns.user_id=visitor", "source.columns.ts=t", "source.columns.item_id=item", "source.ts_format=epoch_s"]
    mapping += [f"source.columns.{c}=null" for c in ("event_type", "category_id", "price", "event_id")]
    args = ["run", "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(tmp_path / "ev"), "--output", str(tmp_path / "out")]
    # every stage and the bag-of-events baseline that failed, nothing the other tests measure
    light = ["encoder.epochs=2", "cluster.k_min=2", "cluster.k_max=3", "cluster.stability_runs=0", "evaluate.downstream=false"]
    args += ["--run-id", "views"] + [x for s in SMALL + mapping + light for x in ("--set", s)]
    code = main(args)
    captured = capfd.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "views: succeeded" in captured.out and "bag_of_events" in captured.out
    assert "ERROR Executor" not in captured.err and "ArrayIndexOutOfBounds" not in captured.err, captured.err[-3000:]


def _pins(libset: str) -> set[str]:
    lines = (REPO / ".ci" / "compat" / f"{libset}.txt").read_text().splitlines()
    return {ln.split("==")[0].strip().lower() for ln in lines if "==" in ln and not ln.lstrip().startswith("#")}


ALL_SETS = sorted(p.stem for p in (REPO / ".ci" / "compat").glob("*.txt"))
# the sets with TensorFlow run everything; the others (PyTorch only) embed and assign with an
# encoder trained under TensorFlow (test_an_encoder_trained_under_tensorflow_runs_under_torch)
COMPAT_SETS = [s for s in ALL_SETS if _pins(s) & {"tensorflow", "tensorflow-cpu"}]
TORCH_SETS = [s for s in ALL_SETS if s not in COMPAT_SETS and "torch" in _pins(s)]
PROTECTED = {"pyspark", "pandas", "numpy", "pyarrow", "scikit-learn", "tensorflow", "tensorflow-cpu", "keras", "delta-spark", "torch"}


def _compat_env(libset: str):
    import os

    env = REPO / ".venv-compat" / libset
    if not (env / ".installed").exists():
        if os.environ.get("SEQCLUST_REQUIRE_COMPAT"):
            pytest.fail(f"{env} is not built and SEQCLUST_REQUIRE_COMPAT is set (CI): `make compat` failed")
        pytest.skip(f"{env} is not built (`make compat` builds it; CI does)")
    return env


def _wheel_changes(env, tmp_path) -> dict[str, str]:
    """What installing seqclust into ``env`` would install or change (pip --dry-run)."""
    import json
    import subprocess

    report = tmp_path / "report.json"
    subprocess.run(
        [str(env / "bin" / "pip"), "install", "--dry-run", "--quiet", "--report", str(report), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


TORCH_EMBED = """
import json, sys
import numpy as np
from seqclust.represent.encoder import embedding_fn, load_artifact
art = load_artifact(sys.argv[1])
with np.load(sys.argv[2]) as z:
    feats = {f: z[f] for f in z.files}
vec = embedding_fn(art.model_cfg, art.weights, threads=1)(feats)
import keras
np.save(sys.argv[3], vec)
print(json.dumps({"backend": keras.backend.backend(), "rows": len(vec)}))
"""


@pytest.mark.parametrize("libset", TORCH_SETS)
def test_an_encoder_trained_under_tensorflow_runs_under_torch(spark, data, e2e_out, libset, tmp_path):
    """A runtime with PyTorch and no TensorFlow (.ci/compat, Databricks ML 19's kind): the
    wheel leaves its packages alone; Keras runs on the torch backend; the e2e run's encoder
    (trained here under TensorFlow) gives the same vectors there (within 1e-5), and `assign`
    there puts every user in the same segment as the run here; training there stops with a
    clear message."""
    import json
    import shutil
    import subprocess

    from pyspark.sql import functions as F

    from seqclust.represent.encoder import embedding_fn, load_artifact

    env = _compat_env(libset)
    changed = _wheel_changes(env, tmp_path)
    assert not (set(changed) & PROTECTED), f"installing seqclust into {libset} would change {changed}"
    ref, _ = e2e_out
    run = spark.read.format("delta").load(str(ref / "runs")).where("run_id = 'e2e-1'").first()
    art = load_artifact(run["encoder_path"])
    # 1. the same weights, the same vectors: every token id, every length up to max_len
    rng = np.random.default_rng(3)
    L, n = art.model_cfg["max_len"], 2000
    lens = rng.integers(1, L + 1, n)
    feats = {}
    for f, size in art.model_cfg["sizes"].items():
        x = rng.integers(1, size - 1, (n, L)).astype(np.int32)
        x[np.arange(L)[None, :] >= lens[:, None]] = 0
        feats[f] = x
    np.savez(tmp_path / "feats.npz", **feats)
    here = embedding_fn(art.model_cfg, art.weights, threads=1)(feats)
    proc = subprocess.run(
        [str(env / "bin" / "python"), "-c", TORCH_EMBED, str(art.path), str(tmp_path / "feats.npz"), str(tmp_path / "there.npy")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"backend": "torch", "rows": n}
    diff = float(np.abs(np.load(tmp_path / "there.npy") - here).max())
    print(f"{libset}: max |TensorFlow - torch| over {n} sessions: {diff:.2e}")
    assert diff <= 1e-5
    # 2. assign there, with the run's encoder and segments: the same segment for every user
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    proc = subprocess.run(
        [str(env / "bin" / "seqclust"), "assign", "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events")]
        + ["--output", str(out), "--run-id", "torch", "--model", "e2e-1"]
        + [x for s in SMALL + ["evaluate.downstream=false"] for x in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def segments(run_id):
        rows = (
            spark.read.format("delta")
            .load(str(out / "clusters"))
            .where((F.col("run_id") == run_id) & (F.col("granularity") == "coarse"))
            .select("entity_id", "cluster_id")
            .collect()
        )
        return dict(rows)

    assert segments("torch") == segments("e2e-1")

    def vectors(run_id):
        rows = spark.read.format("delta").load(str(out / "embeddings")).where(F.col("run_id") == run_id)
        return {r["entity_id"]: np.array(r["embedding"]) for r in rows.where("entity_type = 'session'").collect()}

    a, b = vectors("e2e-1"), vectors("torch")
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[s] - b[s]).max()) for s in a) <= 1e-5
    # 3. training there (the train stage on the sessions assign wrote): one clear line, no traceback
    proc = subprocess.run(
        [str(env / "bin" / "seqclust"), "train", "--conf", str(REPO / "conf" / "local.yaml"), "--output", str(out), "--run-id", "torch"]
        + [x for s in SMALL for x in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=_clean_env(),
    )
    assert proc.returncode != 0
    assert "training the encoder needs TensorFlow" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("libset", COMPAT_SETS)
def test_the_same_run_on_another_runtime_library_set(spark, data, e2e_out, libset, tmp_path):
    """The compatibility matrix (.ci/compat/<set>.txt, venvs built by `make compat`): installing
    the package there would change none of the runtime's packages, and the unit tests of the
    code that differs between Spark lines pass there. On the oldest line (the one whose
    artifacts and APIs differ most from ours) the e2e run is repeated too: the same sessions and
    row counts, agreeing segments, and its encoder and segments used by `assign` here. The
    lines in between run the unit tests only: a whole run there costs 5-6 minutes of the
    suite's budget, and the newest line is this environment's."""
    import subprocess
    import time

    from pyspark.sql import functions as F
    from sklearn.metrics import adjusted_rand_score

    env = _compat_env(libset)
    # 1. the wheel would leave the runtime's packages alone
    changed = _wheel_changes(env, tmp_path)
    assert not (set(changed) & PROTECTED), f"installing seqclust into {libset} would change {changed}"
    # 2. the unit tests of the code that differs between Spark lines (the e2e run below covers
    # the rest; its source has native types, so the try_cast path is tested here)
    unit = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"] + [str(REPO / "tests" / "test_compat.py")],
        capture_output=True,
        text=True,
        timeout=1800,
        env=_clean_env(),
        cwd=str(REPO),
    )
    assert unit.returncode == 0, unit.stdout[-3000:]
    if libset != COMPAT_SETS[0]:
        return
    # 3. the same run there
    ref, _ = e2e_out
    out = tmp_path / "out"
    t0 = time.perf_counter()
    # the next-session families are left out there (they only add metrics rows; the suite's
    # time budget), every table compared below is written in full
    proc = subprocess.run(
        [str(env / "bin" / "seqclust"), *_args(data, out, "e2e-1"), "--set", "evaluate.downstream=false"],
        capture_output=True,
        text=True,
        timeout=1800,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wall = time.perf_counter() - t0

    def table(root, name, run_id="e2e-1"):
        return spark.read.format("delta").load(str(root / name)).where(F.col("run_id") == run_id)

    for name in ("events", "quarantine", "sessions", "session_quarantine", "embeddings", "clusters", "centroids", "cluster_profiles"):
        assert table(out, name).count() == table(ref, name).count(), name
    sess = {r["session_id"] for r in table(out, "sessions").select("session_id").collect()}
    assert sess == {r["session_id"] for r in table(ref, "sessions").select("session_id").collect()}

    def segments(root, run_id="e2e-1"):
        rows = table(root, "clusters", run_id).where("granularity = 'coarse'").select("entity_id", "cluster_id").collect()
        return {r["entity_id"]: r["cluster_id"] for r in rows}

    here, there = segments(ref), segments(out)
    users = sorted(here)
    agreement = adjusted_rand_score([here[u] for u in users], [there[u] for u in users])

    def metric(root, method, name):
        return table(root, "metrics").where(f"method = '{method}' AND metric = '{name}'").first()["value"]

    ari_here, ari_there = metric(ref, "encoder", "ari"), metric(out, "encoder", "ari")
    print(f"{libset}: run {wall:.0f}s, segments ARI between environments {agreement:.3f}, ARI vs personas {ari_here:.3f} / {ari_there:.3f}")
    assert agreement >= 0.9, agreement
    assert abs(ari_here - ari_there) <= 0.1
    # 4. the encoder and segments made there, used by `assign` here: the same users' segments
    # (the next-session evaluation left out: the main test covers it)
    code = main(
        ["assign", "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events"), "--output", str(out)]
        + ["--run-id", "xenv", "--model", "e2e-1"]
        + [x for s in SMALL + ["evaluate.downstream=false"] for x in ("--set", s)]
    )
    assert code == 0
    assigned = segments(out, "xenv")
    common = sorted(set(assigned) & set(there))
    assert len(common) >= 0.95 * len(there)
    assert adjusted_rand_score([there[u] for u in common], [assigned[u] for u in common]) >= 0.99


def _clean_env():
    import os

    # KERAS_BACKEND: set in this process once Keras was chosen; another environment chooses its own
    drop = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV", "PYTHONPATH", "KERAS_BACKEND")
    return {k: v for k, v in os.environ.items() if k not in drop}
