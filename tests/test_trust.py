"""The verdicts per level: a sentence per job, against the references measured beside it."""

from __future__ import annotations

import json

from seqclust.evaluate.trust import statements


def _row(method, metric, value, low=None, high=None, family="downstream", **details):
    return {
        "method": method,
        "family": family,
        "metric": metric,
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "details": json.dumps(details),
    }


def test_a_level_no_better_than_bag_of_events_says_so_and_weak_persistence_is_called_weak():
    rows = [
        _row("encoder", "conversion_auc", 0.538, 0.52, 0.55),
        _row("bag_of_events", "conversion_auc", 0.552, 0.54, 0.565),
        _row("random", "conversion_auc", 0.50, 0.49, 0.51),
        _row("encoder", "temporal_ari", 0.10, 0.09, 0.11),
        _row("random", "temporal_ari", 0.0, -0.01, 0.01),
        _row("encoder", "hitrate@10_items_cluster", 0.30, 0.28, 0.32),
        _row("bag_of_events", "hitrate@10_items_cluster", 0.20, 0.18, 0.22),
        _row("random", "hitrate@10_items_cluster", 0.10, 0.09, 0.11),
        _row("encoder", "confident_share", 0.4, threshold=0.2),
        _row("encoder", "confident_share", 0.9, segment=0),  # one segment's figure: not the run's
    ]
    (top,) = statements(rows)
    assert top.startswith("top level: 40% of users confident")
    assert "conversion: no better than bag-of-events segments (AUC 0.538 vs bag-of-events segments 0.552" in top
    assert "stability: weak (ARI 0.100" in top
    assert "next-session items: better than bag-of-events segments and random segments (HitRate 0.300" in top


def test_no_better_than_random_wins_over_everything_and_unmeasured_levels_are_left_out():
    rows = [
        _row("encoder", "conversion_auc", 0.505, 0.49, 0.52),
        _row("random", "conversion_auc", 0.50, 0.48, 0.515),
        _row("encoder", "temporal_ari", 0.8, 0.78, 0.82),
        _row("random", "temporal_ari", 0.0, -0.01, 0.01),
        _row("leaf", "confident_share", 0.3),  # the leaves have no job measured (nothing split)
        _row("leaf", "silhouette", 0.2),
    ]
    out = statements(rows)
    assert len(out) == 1 and "conversion: no better than random segments" in out[0]
    assert "stability: better than random segments (ARI 0.800" in out[0]


def test_leaves_and_confident_members_get_lines_of_their_own_against_all_members():
    rows = [
        _row("encoder", "temporal_ari", 0.55, 0.5, 0.6),
        _row("random", "temporal_ari", 0.0, -0.01, 0.01),
        _row("leaf", "temporal_ari", 0.05, 0.0, 0.1),
        _row("confident", "temporal_ari", 0.9, 0.88, 0.92),
        _row("encoder", "confident_share", 0.6),
    ]
    top, leaf, sure = statements(rows)
    assert leaf.startswith("leaves: stability: weak")
    assert sure.startswith("confident members (top level): 60% of users; stability: better than all members and random segments")
    assert "stability: better than random segments" in top


def test_a_tree_that_did_not_split_says_so_and_one_that_did_does_not():
    top = [_row("encoder", "temporal_ari", 0.6, 0.55, 0.65), _row("random", "temporal_ari", 0.0, -0.01, 0.01)]
    flat = [_row("leaf", "split", 0.0, family="hierarchy", segment_path=str(i)) for i in range(3)]
    assert statements(top + flat)[-1] == "leaves: no segment holds segments of its own (3 tested); the leaves are the top level"
    split = flat[:2] + [_row("leaf", "split", 1.0, family="hierarchy", segment_path="2")]
    assert not any(t.startswith("leaves: no segment") for t in statements(top + split))
