import datetime as dt

import pytest

from seqclust.segment.profiles import cluster_profiles

T0 = dt.datetime(2026, 10, 1)


def test_profiles_exact_figures(spark):
    # cluster 0: u1 (buyer, pricey), u2 ; cluster 1: u3 (browser, cheap)
    sessions = spark.createDataFrame(
        [
            ("u1", 2, 60.0, {"view": 1, "purchase": 1}, ["a", "a"], [100.0, 100.0], [0.0, 60.0]),
            ("u2", 2, 120.0, {"view": 2}, ["a", "b"], [50.0, 50.0], [0.0, 120.0]),
            ("u3", 4, 30.0, {"view": 4}, ["b", "b", "b", "c"], [10.0, 10.0, 10.0, 10.0], [0.0, 10.0, 10.0, 10.0]),
        ],
        "user_id string, n_events int, duration_s double, event_counts map<string,int>, categories array<string>, prices array<double>, gaps_s array<double>",
    )
    clusters = spark.createDataFrame([("u1", 0), ("u2", 0), ("u3", 1)], "entity_id string, cluster_id int")
    p = {r["cluster_id"]: r for r in cluster_profiles(spark, sessions, clusters, top_n=2).collect()}
    assert (p[0]["size"], p[1]["size"]) == (2, 1)
    assert p[0]["share"] == pytest.approx(2 / 3)
    assert p[0]["conversion_rate"] == 0.5 and p[1]["conversion_rate"] == 0.0
    assert p[0]["event_mix"] == pytest.approx({"view": 0.75, "purchase": 0.25})
    assert p[0]["event_mix_lift"]["purchase"] == pytest.approx(0.25 / (1 / 8))
    # category a: 3 of cluster 0's 4 events; overall 3 of 8 -> lift 2
    top0 = p[0]["top_categories"]
    assert top0[0]["category"] == "a" and top0[0]["share"] == pytest.approx(0.75) and top0[0]["lift"] == pytest.approx(2.0)
    assert len(p[1]["top_categories"]) == 2 and p[1]["top_categories"][0]["category"] == "b"
    # percentile_approx takes the lower middle value: overall 10, cluster 0 50, cluster 1 10
    assert (p[0]["median_price"], p[1]["median_price"]) == (50.0, 10.0)
    assert (p[0]["price_index"], p[1]["price_index"]) == (5.0, 1.0)
    assert "67% of users" in p[0]["description"] and "purchase events 2.0x" in p[0]["description"]
    # measured on a sample of each segment's users: sizes and shares are the exact ones given,
    # every other figure is the sample's
    q = {r["cluster_id"]: r for r in cluster_profiles(spark, sessions, clusters, top_n=2, sizes={0: 100, 1: 300}).collect()}
    assert (q[0]["size"], q[1]["size"]) == (100, 300) and q[1]["share"] == pytest.approx(0.75)
    assert q[0]["sessions_per_user"] == p[0]["sessions_per_user"] == 1.0 and q[0]["median_price"] == 50.0
    assert "25% of users" in q[0]["description"]
