"""Bad input and bad config end in a quarantine reason or one clear line, never a traceback."""

from pathlib import Path

import pytest

from seqclust.app.cli import main
from seqclust.core.config import SourceConfig
from seqclust.core.errors import InputError, MissingColumnError
from seqclust.runtime.store import read_source

REPO = Path(__file__).resolve().parents[1]


def _cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_wrong_delimiter_names_the_columns_it_saw(spark, tmp_path):
    p = tmp_path / "ev.csv"
    p.write_text("user_id;ts;event_type\nu1;2026-10-01T10:00:00Z;view\n")
    with pytest.raises(MissingColumnError, match=r"columns: user_id;ts;event_type\).*source.delimiter"):
        read_source(spark, str(p), SourceConfig(format="csv"))


def test_extra_columns_are_ignored_but_kept_in_raw(spark, tmp_path):
    import datetime as dt

    from seqclust.ingest.stage import validate

    p = tmp_path / "ev.csv"
    p.write_text("user_id,ts,event_type,campaign\nu1,2026-10-01T10:00:00Z,view,x1\nu1,bad,view,x2\n")
    rows = validate(
        read_source(spark, str(p), SourceConfig(format="csv")), SourceConfig(), dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    ).collect()
    assert [r["reason"] for r in rows] == [None, "bad_ts"]
    assert '"campaign":"x2"' in rows[1]["raw"]
    assert rows[0]["raw"] is None  # only quarantined rows carry their record as text


def test_unreadable_delta_table(spark, tmp_path):
    d = tmp_path / "broken"
    (d / "_delta_log").mkdir(parents=True)
    (d / "_delta_log" / "00000000000000000000.json").write_text("not json at all")
    with pytest.raises(InputError, match="cannot read as delta"):
        read_source(spark, str(d), SourceConfig())


def test_unsafe_run_id_on_the_command_line(capsys, tmp_path):
    code, err = _cli(capsys, "run", "--conf", str(REPO / "conf" / "local.yaml"), "--run-id", "x'; drop", "--output", str(tmp_path))
    assert code == 2 and err[-1].startswith('seqclust: error: run_id: "x\'; drop" is not allowed')


def test_output_path_not_writable(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = tmp_path / "ev.csv"
    p.write_text("user_id,ts,event_type\nu1,2026-10-01T10:00:00Z,view\n")
    code, err = _cli(
        capsys, "ingest", "--conf", str(REPO / "conf" / "local.yaml"), "--run-id", "w1", "--input", str(p), "--output", str(blocker / "out")
    )
    assert code == 2 and err[-1].startswith("seqclust: error:") and "not writable" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_resume_without_run_id_and_unknown_preset(capsys):
    code, err = _cli(capsys, "run", "--resume")
    assert code == 2 and err[-1] == "seqclust: error: --resume needs the --run-id of the run to continue"
    code, err = _cli(capsys, "run", "--preset", "nosuch")
    assert code == 2 and "unknown preset" in err[-1]
