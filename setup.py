"""Packaging for seqclust: the package lives in lib/, the console script is `seqclust`."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = "0.1.0"

# The base requirements admit the library sets of the Databricks ML runtimes we test
# (.ci/compat/: 16.4 LTS ML = Spark 3.5 with pandas 1.5.3, numpy 1.26, pyarrow 15, scikit-learn
# 1.4; 17.3 LTS ML = Spark 4.0 with pandas 2.2, numpy 2.1, pyarrow 19, scikit-learn 1.6), so
# installing the wheel on such a cluster changes none of the runtime's packages (CI checks this
# with `pip install --dry-run` in each environment).
BASE = [
    "pandas>=1.5.3,<3",
    "pyarrow>=14",
    "numpy>=1.23",
    "scikit-learn>=1.3",
    "matplotlib>=3.7",  # the HTML report's charts
    "PyYAML>=6",
]
# The fresh-machine path (`make setup`) pins today's set: pyspark 4.2 pairs with delta-spark 4.4
# (Maven Central serves io.delta:delta-spark_4.2_2.13:4.4.0, the jar delta-spark 4.4.0 asks
# for), and pyspark 4.2 warns on pandas 3.
LOCAL_PINS = ["pandas>=2.2,<3", "pyarrow>=15", "numpy>=1.26", "scikit-learn>=1.4"]
# Spark and TensorFlow are extras, not requirements: a Databricks (ML) runtime brings its own
# pyspark, Delta and TensorFlow, and a wheel that pulled pip's copies would shadow them.
# Everywhere else install seqclust[local].
SPARK = ["pyspark==4.2.*", "delta-spark==4.4.0"]
ML = ["tensorflow-cpu==2.21.*", "keras>=3.10,<4"]  # Keras 3 is the contract (Keras 2 is refused)
# MLflow tracking (tracking.mlflow: true); the skinny client has the local file store
MLFLOW = ["mlflow-skinny>=2.16", "sqlalchemy>=2", "alembic>=1.13"]
# A scheduler host that imports seqclust next to Airflow (the DAG file itself does not)
AIRFLOW = ["apache-airflow>=2.10,<4", "apache-airflow-providers-apache-spark", "apache-airflow-providers-databricks"]
# duckdb: the independent sessionizer in tests and bench/sessionize.py; hypothesis: property tests
DEV = ["pytest>=8", "pytest-xdist>=3.5", "deltalake>=0.25", "ruff>=0.6", "mypy>=1.10", "duckdb>=1.1", "hypothesis>=6.100", "psutil>=5.9", *MLFLOW]

setup(
    name="seqclust",
    version=VERSION,
    description="User-behaviour segments from e-commerce event logs, with evidence of their quality",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"seqclust.ingest": ["presets/*.yaml"], "seqclust.runtime": ["log4j2.properties"]},
    install_requires=BASE,
    extras_require={"spark": SPARK, "ml": ML, "local": SPARK + ML + LOCAL_PINS, "mlflow": MLFLOW, "airflow": AIRFLOW, "dev": DEV},
    entry_points={"console_scripts": ["seqclust=seqclust.app.cli:main"]},
)
