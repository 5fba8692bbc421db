"""The HTML report's run table, read back from the Delta tables."""

from __future__ import annotations


def test_report_says_how_many_users_a_sampled_evaluation_measured(spark, ctx):
    from seqclust.app.pipeline import save_record
    from seqclust.core.tables import MetricRow, RunRecord
    from seqclust.report.page import write_report
    from seqclust.runtime.context import write_metrics

    save_record(spark, ctx, RunRecord(status="succeeded", users=30000, k=3))

    def report_for(evaluated: float) -> str:
        row = MetricRow(method="encoder", k=3, family="internal", metric="evaluated_users", value=evaluated)
        write_metrics(spark, ctx, [row], families=("internal",))
        return write_report(spark, ctx).read_text()

    sampled = report_for(24827.0)
    assert "<td class=l>evaluated_users</td><td class=r>24827 (seeded hash sample: evaluate.sample_users)</td>" in sampled
    assert "seeded hash sample" not in report_for(30000.0)  # everyone measured: nothing to say


def test_report_says_k_uncertain_with_the_runner_up_only_when_the_rule_did(spark, ctx):
    from seqclust.app.pipeline import save_record
    from seqclust.core.tables import MetricRow, RunRecord
    from seqclust.report.page import write_report
    from seqclust.runtime.context import write_metrics

    save_record(spark, ctx, RunRecord(status="succeeded", users=300, k=3))

    def report_for(uncertain: bool) -> str:
        det = {"rule": "smallest k with silhouette within 5% of the best", "uncertain": uncertain, "runner_up": 9 if uncertain else None}
        rows = [
            MetricRow(method="encoder", k=k, family="sweep", metric="silhouette", value=0.2, details={**det, "chosen": k == 3})
            for k in (2, 3, 9)
        ]
        write_metrics(spark, ctx, rows, families=("sweep",))
        return write_report(spark, ctx).read_text()

    unsure = report_for(True)
    assert "<b>k uncertain</b>: k = 3 was chosen, but k = 9 fits about as well" in unsure
    assert "How k was chosen: smallest k with silhouette within 5% of the best" in unsure
    sure = report_for(False)
    assert "k uncertain" not in sure and "How k was chosen" in sure
