from pathlib import Path

import pytest
import yaml

from seqclust.core.config import PipelineConfig, SparkConfig, load_config, validate_run_id
from seqclust.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_base_yaml_equals_dataclass_defaults():
    base = yaml.safe_load((REPO / "conf" / "base.yaml").read_text())
    assert base == PipelineConfig().to_dict()


def test_env_overlay_and_set_overrides():
    cfg = load_config(
        REPO / "conf" / "local.yaml", overrides=["cluster.k=8", "encoder.architecture=transformer", "source.columns.item_id=null"]
    )
    assert cfg.spark.master == "local[*]"  # from local.yaml
    assert cfg.sessionize.gap_minutes == 30.0  # from base.yaml
    assert cfg.cluster.k == 8
    assert cfg.encoder.architecture == "transformer"
    assert cfg.source.columns.item_id is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.kk=3", "cluster.kk: unknown config key"),
        ("nosuch=1", "nosuch: unknown config key"),
        ("cluster.k=abc", "cluster.k: expected an integer"),
        ("cluster.k=1", "cluster.k: must be >= 2"),
        ("encoder.architecture=lstm", "encoder.architecture: 'lstm' is not one of gru, transformer"),
        ("sessionize.gap_minutes=-5", "sessionize.gap_minutes: must be > 0"),
        ("tables.sessions=x;drop table", "tables.sessions: 'x;drop table' is not a valid name"),
        ("run.run_id=../../etc", "run_id: '../../etc' is not allowed"),
        ("source.event_types.clk=click", "source.event_types.clk: must be one of"),
        ("cluster.k", "expected key=value"),
        ("cluster.sweep_sample=null", "cluster.sweep_sample: expected an integer"),  # the sweep is in driver memory: bounded
        ("cluster.sweep_sample=5000000", "cluster.sweep_sample: must be a number of users from 100 to 2000000"),
        ("evaluate.sample_users=10", "evaluate.sample_users: must be >= 1000 or null"),
        ("cluster.profile_sample=10", "cluster.profile_sample: must be >= 1000 or null"),
        ("source.ts_format=iso", "source.ts_format: 'iso' is neither one of auto, epoch_s, epoch_ms, iso8601 nor a Spark datetime pattern"),
        ("source.ts_format=yyyy-MM-dd'T", 'source.ts_format: "yyyy-MM-dd\'T" is neither'),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "conf" / "local.yaml", overrides=[override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  seed: 1\n")
    (tmp_path / "x.yaml").write_text("spark:\n  shuffle_partitons: 3\n")
    with pytest.raises(ConfigError, match=r"spark.shuffle_partitons: unknown config key"):
        load_config(tmp_path / "x.yaml")


def test_wrong_type_in_yaml_file(tmp_path):
    (tmp_path / "x.yaml").write_text("tokenize:\n  max_len: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"tokenize.max_len: expected an integer"):
        load_config(tmp_path / "x.yaml")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("run: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_config_is_frozen_and_hash_is_stable():
    a, b = load_config(REPO / "conf" / "local.yaml"), load_config(REPO / "conf" / "local.yaml")
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != load_config(REPO / "conf" / "local.yaml", overrides=["run.seed=1"]).config_hash()
    with pytest.raises(Exception):
        a.run.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("rid", ["2026-11-28", "run_1.a", "A"])
def test_valid_run_ids(rid):
    assert validate_run_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "a b", "x'--", "../x", "-x", "a" * 65])
def test_invalid_run_ids(rid):
    with pytest.raises(ConfigError):
        validate_run_id(rid)


def test_token_fields_are_checked():
    import pytest

    from seqclust.core.config import load_config
    from seqclust.core.errors import ConfigError

    cfg = load_config(None, overrides=["tokenize.token_fields=[item, gap_bucket]"])
    assert cfg.tokenize.token_fields == ["item", "gap_bucket"]
    with pytest.raises(ConfigError, match="token_fields: unknown field\\(s\\) 'brand'"):
        load_config(None, overrides=["tokenize.token_fields=[event_type, brand]"])


@pytest.mark.parametrize("fmt", ["auto", "epoch_ms", "yyyy-MM-dd HH:mm:ss", "yyyy-MM-dd HH:mm:ss 'UTC'", "dd/MM/yyyy'T'HH:mm:ss.SSSXXX"])
def test_timestamp_formats_that_load(fmt):
    assert load_config(REPO / "conf" / "local.yaml", overrides=[f"source.ts_format={fmt}"]).source.ts_format == fmt


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_demo_conf_is_local_with_only_its_documented_trims():
    """`make run` uses conf/demo.yaml: the laptop settings plus a few trims the README lists;
    nothing else of the model may differ from what a user's own data gets with local.yaml."""
    local = _flat(load_config(REPO / "conf" / "local.yaml").to_dict())
    demo = _flat(load_config(REPO / "conf" / "demo.yaml").to_dict())
    changed = {k for k in local if local[k] != demo[k]}
    assert changed == {"encoder.epochs", "cluster.n_init", "report.tsne_users", "evaluate.bootstrap"}
    assert demo["encoder.epochs"] < local["encoder.epochs"] and demo["evaluate.bootstrap"] < local["evaluate.bootstrap"]
    readme = (REPO / "README.md").read_text()
    assert all(k in readme for k in changed)  # the README says what the demo trims
    assert "conf/demo.yaml" in (REPO / "Makefile").read_text()


def test_a_kafka_source_needs_its_broker_and_topic_and_only_streams(tmp_path, capsys):
    """source.format kafka: both source.kafka keys or a ConfigError naming them; the batch reader
    refuses it; `stream` takes it without --input, and refuses --input with it (no Spark)."""
    import pyspark

    from seqclust.app.cli import main
    from seqclust.core.errors import InputError
    from seqclust.runtime.spark import kafka_package
    from seqclust.runtime.store import read_source

    base = ["source.format=kafka"]
    with pytest.raises(ConfigError, match="source.kafka.bootstrap_servers and source.kafka.topic"):
        load_config(None, overrides=[*base, "source.kafka.topic=t"])
    with pytest.raises(ConfigError, match="starting_offsets"):
        load_config(None, overrides=["source.kafka.starting_offsets=middle"])
    with pytest.raises(ConfigError, match="kafka.options.subscribe"):
        load_config(None, overrides=['source.kafka.options={"subscribe": "x"}'])
    cfg = load_config(None, overrides=[*base, "source.kafka.bootstrap_servers=h:9092", "source.kafka.topic=t"])
    assert cfg.source.kafka.bootstrap_servers == "h:9092" and cfg.source.kafka.starting_offsets == "earliest"
    with pytest.raises(InputError, match="only `seqclust stream` reads Kafka"):
        read_source(None, "anything", cfg.source)  # type: ignore[arg-type]
    assert kafka_package().startswith("org.apache.spark:spark-sql-kafka-0-10_2.1") and kafka_package().endswith(pyspark.__version__)
    common = ["--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "out")]
    kafka = ["--set", "source.kafka.bootstrap_servers=h:9092", "--set", "source.kafka.topic=t"]
    assert main(["stream", "--model", "m", "--format", "kafka", "--input", "x", *common, *kafka]) != 0
    assert "a Kafka topic is source.kafka.topic" in capsys.readouterr().err
    assert main(["stream", "--model", "m", *common]) != 0
    assert "pass --input PATH" in capsys.readouterr().err


def test_shuffle_partitions_grow_with_the_rows_and_never_below_the_configured_floor():
    from seqclust.runtime.spark import MIN_PARTITIONS_KEY, ROWS_PER_PARTITION_KEY, scale_shuffle

    class Conf(dict):
        def get(self, k, default=None):
            return super().get(k, default)

        def set(self, k, v):
            self[k] = v

    class Session:
        conf = Conf({"spark.sql.shuffle.partitions": "4", MIN_PARTITIONS_KEY: "4", ROWS_PER_PARTITION_KEY: "2500000"})

    s = Session()
    assert scale_shuffle(s, 100_000_000) == 40 and s.conf["spark.sql.shuffle.partitions"] == "40"
    assert scale_shuffle(s, 10_000_001) == 5
    assert scale_shuffle(s, 1_000_000) == 4 and s.conf["spark.sql.shuffle.partitions"] == "4"  # back to the floor
    assert scale_shuffle(s, None) == 4
    s.conf[ROWS_PER_PARTITION_KEY] = "0"
    assert scale_shuffle(s, 100_000_000) == 4  # 0: never more
    assert SparkConfig(rows_per_partition=0).rows_per_partition == 0
    with pytest.raises(ConfigError, match="rows_per_partition"):
        SparkConfig(rows_per_partition=-1)


def test_the_configuration_reference_holds_base_yaml_as_it_is():
    """docs/CONFIGURATION.md's "Every key" block is conf/base.yaml, byte for byte (so every key
    and its comment is documented, and a key added to one is added to the other)."""
    doc = (REPO / "docs" / "CONFIGURATION.md").read_text()
    block = doc.split("## Every key", 1)[1].split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert block.rstrip() == (REPO / "conf" / "base.yaml").read_text().rstrip()
