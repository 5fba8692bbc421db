"""The report's pictures from small hand-made tables: the map's sample and projection, the
heatmap's lifts, the typical journeys' n-gram lifts and examples, the flows between runs, each
against a plain-Python / scikit-learn oracle; the report embeds them as decodable images."""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import re
from collections import Counter

import numpy as np
import pytest

from seqclust.core import tables

T0 = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.timezone.utc)


def _write(spark, ctx, key: str, rows: list[dict]) -> None:
    schema = tables.TABLES[key].schema
    ctx.write(spark.createDataFrame([tuple(r.get(f) for f in schema.fieldNames()) for r in rows], schema), key)


def _session(sid: str, user: str, events: list[str], gap: float = 30.0) -> dict:
    n = len(events)
    return {
        "session_id": sid,
        "user_id": user,
        "start_ts": T0,
        "end_ts": T0 + dt.timedelta(seconds=gap * (n - 1)),
        "duration_s": gap * (n - 1),
        "n_events": n,
        "event_counts": dict(Counter(events)),
        "event_types": events,
        "categories": ["c1"] * n,
        "items": [f"i{i}" for i in range(n)],
        "prices": [10.0] * n,
        "gaps_s": [0.0] + [gap] * (n - 1),
        "tokens": [f"{e}:c1" for e in events],
        "is_modelled": True,
    }


@pytest.fixture()
def small_run(spark, ctx):
    """150 users in 3 segments with distinct journeys; segment 2's users have one session."""
    rng = np.random.default_rng(3)
    patterns = {0: ["view", "view", "cart", "purchase"], 1: ["search", "view", "search", "view"], 2: ["view", "fav", "view"]}
    sessions, clusters, emb = [], [], []
    centres = {0: np.array([3.0, 0, 0, 0]), 1: np.array([0, 3.0, 0, 0]), 2: np.array([0, 0, 3.0, 0])}
    for u in range(150):
        c = u % 3
        n_sess = 1 if c == 2 else 2
        for j in range(n_sess):
            sessions.append(_session(f"s{u}-{j}", f"u{u}", patterns[c] + (["view"] if j else [])))
        v = centres[c] + rng.normal(0, 0.3, 4)
        emb.append(
            {"entity_type": "user", "entity_id": f"u{u}", "embedding": [float(x) for x in v], "encoder_id": "e", "n_sessions": n_sess}
        )
        clusters.append(
            {
                "entity_type": "user",
                "entity_id": f"u{u}",
                "cluster_id": c,
                "distance_to_centroid": float(np.linalg.norm(v - centres[c])),
                "granularity": "coarse",
            }
        )
    _write(spark, ctx, "sessions", sessions)
    _write(spark, ctx, "clusters", clusters)
    _write(spark, ctx, "embeddings", emb)
    _write(
        spark,
        ctx,
        "centroids",
        [{"cluster_id": c, "method": "encoder", "centroid": [float(x) for x in centres[c]], "size": 50} for c in centres],
    )
    return sessions, clusters, emb


def test_journeys_lifts_match_a_plain_python_count(spark, ctx, small_run):
    from seqclust.report.explain import journeys

    sessions, clusters, _ = small_run
    seg = {c["entity_id"]: c["cluster_id"] for c in clusters}
    j = journeys(spark, ctx, top=5, examples=2, neighbourhood=5, seed=1, min_count=5)
    assert j is not None
    for n in (2, 3):
        per: dict[int, Counter] = {}
        for s in sessions:
            ev = s["event_types"]
            per.setdefault(seg[s["user_id"]], Counter()).update(" > ".join(ev[i : i + n]) for i in range(len(ev) - n + 1))
        everyone = sum(per.values(), Counter())
        tot = sum(everyone.values())
        for c, cnt in per.items():
            for g, lift, count in j.ngrams[c]:
                if g.count(">") != n - 1:
                    continue
                want = (cnt[g] / sum(cnt.values())) / (everyone[g] / tot)
                assert count == cnt[g] and math.isclose(lift, want, rel_tol=1e-9), (c, g)
    # segment 0's most over-represented sequence ends in a purchase; nothing under 5 occurrences
    assert any("purchase" in g for g, _, _ in j.ngrams[0][:2])
    assert all(count >= 5 for v in j.ngrams.values() for _, _, count in v)
    # examples: from the 5 users nearest each centre, ids hashed
    near = {
        c: sorted((x for x in clusters if x["cluster_id"] == c), key=lambda x: (x["distance_to_centroid"], x["entity_id"]))[:5]
        for c in range(3)
    }
    for c, exs in j.examples.items():
        assert len(exs) == 2
        allowed = {s["session_id"] for s in sessions if s["user_id"] in {x["entity_id"] for x in near[c]}}
        from seqclust.report.explain import short_id

        assert {e["session"] for e in exs} <= {short_id(s) for s in allowed}
        assert all(re.fullmatch(r"[0-9a-f]{10}", e["session"]) for e in exs)


def test_journeys_count_n_grams_over_a_seeded_user_sample(spark, ctx, small_run):
    """With ``sample_users`` below the users there are, the n-grams are those of the sampled
    users' sessions only (the same hash sample as evaluate's), about that many users."""
    from seqclust.core.sampling import in_user_sample
    from seqclust.report.explain import journeys

    sessions, clusters, _ = small_run
    j_all = journeys(spark, ctx, top=20, examples=0, neighbourhood=5, seed=1, min_count=1)
    j = journeys(spark, ctx, top=20, examples=0, neighbourhood=5, seed=1, min_count=1, sample_users=50)
    assert j is not None and j_all is not None
    users = spark.createDataFrame([(f"u{u}",) for u in range(150)], "user_id string")
    kept = {r[0] for r in users.where(in_user_sample("user_id", 50 / 150, 1)).collect()}
    assert 25 <= len(kept) <= 75
    seg = {c["entity_id"]: c["cluster_id"] for c in clusters}
    per: dict[int, Counter] = {}
    for s in sessions:
        if s["user_id"] in kept:
            ev = s["event_types"]
            per.setdefault(seg[s["user_id"]], Counter()).update(" > ".join(ev[i : i + 2]) for i in range(len(ev) - 1))
    for c, grams in j.ngrams.items():
        for g, _, count in grams:
            if g.count(">") == 1:
                assert count == per[c][g], (c, g)
    total = sum(cnt for v in j.ngrams.values() for _, _, cnt in v)
    assert 0 < total < sum(cnt for v in j_all.ngrams.values() for _, _, cnt in v)


def test_map_samples_projects_and_marks_one_session_users(spark, ctx, small_run):
    from sklearn.decomposition import PCA

    from seqclust.core.config import ReportConfig
    from seqclust.report.explain import map_data

    _, _, emb = small_run
    m = map_data(spark, ctx, ReportConfig(map_users=100, tsne_users=0), seed=5)
    assert m is not None and m.users_total == 150 and len(m.xy) == len(m.ids) == 100 and m.tsne_xy is None
    # a seeded sample: the same users again with the same seed, others with another
    assert map_data(spark, ctx, ReportConfig(map_users=100, tsne_users=0), seed=5).ids == m.ids
    assert set(map_data(spark, ctx, ReportConfig(map_users=100, tsne_users=0), seed=6).ids) != set(m.ids)
    # one-session users are exactly segment 2's
    seg2 = {e["entity_id"] for e in emb if e["n_sessions"] == 1}
    assert {i for i, one in zip(m.ids, m.one_session) if one} == seg2 & set(m.ids)
    # the projection is PCA of the sampled vectors (each axis up to its sign)
    vec = {e["entity_id"]: e["embedding"] for e in emb}
    x = np.asarray([vec[i] for i in m.ids])
    ref = PCA(2).fit(x)
    ref_xy = ref.transform(x)
    for a in range(2):
        assert abs(np.corrcoef(m.xy[:, a], ref_xy[:, a])[0, 1]) > 0.9999
    assert math.isclose(sum(m.explained), float(ref.explained_variance_ratio_.sum()), rel_tol=1e-6)
    # centres: projected with the same axes, each amid its own segment's points
    for c in range(3):
        assert np.linalg.norm(m.centroids[c] - m.xy[m.cluster == c].mean(axis=0)) < 1.0
    with_tsne = map_data(spark, ctx, ReportConfig(map_users=100, tsne_users=30), seed=5)
    assert with_tsne is not None and with_tsne.tsne_xy is not None and with_tsne.tsne_xy.shape == (30, 2)


def test_heatmap_lifts_and_missing_fields():
    from seqclust.report.explain import heatmap

    base = {
        "event_mix": {"view": 0.5, "purchase": 0.5},
        "median_session_events": 4.0,
        "median_session_duration_s": 60.0,
        "median_gap_s": 20.0,
        "sessions_per_user": 2.0,
        "top_categories": [],
        "price_index": None,
    }
    profiles = [
        {**base, "cluster_id": 0, "size": 30, "event_mix_lift": {"view": 1.5, "purchase": 0.5}, "conversion_rate": 0.1},
        {
            **base,
            "cluster_id": 1,
            "size": 10,
            "event_mix_lift": {"view": 0.5, "purchase": 2.5},
            "conversion_rate": 0.5,
            "median_gap_s": 60.0,
        },
    ]
    h = heatmap(profiles)
    assert h is not None and h.segments == [0, 1]
    col = {f: h.lift[:, i] for i, f in enumerate(h.features)}
    assert list(col["view share"]) == [1.5, 0.5] and list(col["purchase share"]) == [0.5, 2.5]
    conv_ref = (30 * 0.1 + 10 * 0.5) / 40
    assert np.allclose(col["conversion"], [0.1 / conv_ref, 0.5 / conv_ref])
    gap_ref = (30 * 20 + 10 * 60) / 40
    assert np.allclose(col["time between events"], [20 / gap_ref, 60 / gap_ref])
    assert np.allclose(col["session length"], [1.0, 1.0])
    # no price, no categories in the source: no column for them
    assert "price level" not in h.features and "top category lift" not in h.features


def test_flows_count_users_between_runs(spark, ctx, store):
    import dataclasses

    from seqclust.report.explain import flows

    prev = dataclasses.replace(ctx, run_id="t0")
    old = {f"u{i}": i % 2 for i in range(40)}
    new = {f"u{i}": (i % 2 if i < 30 else 2) for i in range(40) if i != 0}
    for c, mapping in ((prev, old), (ctx, new)):
        _write(
            spark,
            c,
            "clusters",
            [
                {"entity_type": "user", "entity_id": u, "cluster_id": k, "distance_to_centroid": 0.0, "granularity": "coarse"}
                for u, k in mapping.items()
            ],
        )
    f = flows(spark, ctx, "t0", {0: 0, 1: 1})
    want = Counter((old[u], new[u]) for u in new)
    assert f is not None and f.pairs == dict(want) and sum(f.pairs.values()) == 39


def _images(text: str) -> list:
    from PIL import Image

    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        out.append(im)
    return out


def test_report_embeds_every_picture_with_a_caption(spark, ctx, small_run):
    from seqclust.app.pipeline import save_record
    from seqclust.core.config import PipelineConfig, ReportConfig
    from seqclust.core.tables import RunRecord
    from seqclust.report.page import write_report

    save_record(spark, ctx, RunRecord(status="succeeded", users=150, k=3))
    prof = {
        "size": 50,
        "share": 1 / 3,
        "sessions_per_user": 1.5,
        "event_mix": {"view": 0.5},
        "event_mix_lift": {"view": 1.0},
        "conversion_rate": 0.2,
        "median_session_events": 4.0,
        "median_session_duration_s": 90.0,
        "median_gap_s": 30.0,
        "median_price": 10.0,
        "price_index": 1.0,
        "top_categories": [],
        "description": "d",
    }
    _write(spark, ctx, "cluster_profiles", [{**prof, "cluster_id": c, "event_mix_lift": {"view": 0.5 + c}} for c in range(3)])
    import dataclasses

    from seqclust.core.tables import MetricRow
    from seqclust.runtime.context import write_metrics

    # an earlier run the drift was measured against: the report shows users moving between them
    prev = dataclasses.replace(ctx, run_id="t0")
    _, clusters, _ = small_run
    _write(spark, prev, "clusters", [{**c, "cluster_id": (c["cluster_id"] + (c["entity_id"] == "u0")) % 3} for c in clusters])
    _write(spark, prev, "cluster_profiles", [{**prof, "cluster_id": c, "event_mix_lift": {"view": 1.0}} for c in range(3)])
    details = {"previous_run": "t0", "alignment": "centroids", "matched": {"0": 0, "1": 1, "2": 2}}
    write_metrics(
        spark, ctx, [MetricRow(method="encoder", family="drift", metric="psi_cluster_shares", value=0.01, k=3, details=details)], ("drift",)
    )
    cfg = dataclasses.replace(PipelineConfig(), report=ReportConfig(map_users=100, tsne_users=40))
    text = write_report(spark, ctx, cfg).read_text()
    assert not list(ctx.run_dir.glob("*.png"))  # one self-contained file
    for section in ("The map of users", "What sets each segment apart", "Typical journeys", "segment sizes", "Across runs"):
        assert section in text, section
    assert "not drawn" not in text
    assert "<td class=l>0 → 0</td>" in text  # the matched segments' changes
    ims = _images(text)
    assert len(ims) == text.count("<img ") == text.count("<figcaption>") >= 4
    for im in ims:  # decodes, and is a picture, not a blank
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert im.size[0] > 100 and colours is not None and len(colours) > 20
    # journeys: event chips with the time between events
    assert "<span class='ev ev-purchase'>buy</span>" in text and "<span class=gap>30s</span>" in text
    assert "s0-0" not in text  # session ids only as hashes
