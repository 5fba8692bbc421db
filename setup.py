"""Packaging for seqclust: the package lives in lib/, the console script is `seqclust`."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = "0.1.0"

# Pinned together: pyspark 4.2 pairs with delta-spark 4.4 (Maven Central serves
# io.delta:delta-spark_4.2_2.13:4.4.0, the jar delta-spark 4.4.0 asks for), and
# pyspark 4.2 warns on pandas 3.
CORE = [
    "pyspark==4.2.*",
    "delta-spark==4.4.0",
    "pandas>=2.2,<3",
    "pyarrow>=15",
    "numpy>=1.26",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",  # the HTML report's charts
    "PyYAML>=6",
]
ML = ["tensorflow-cpu==2.21.*", "keras>=3.10,<4"]
# duckdb: the independent sessionizer in tests and bench/sessionize.py; hypothesis: property tests
DEV = ["pytest>=8", "deltalake>=0.25", "ruff>=0.6", "duckdb>=1.1", "hypothesis>=6.100"]

setup(
    name="seqclust",
    version=VERSION,
    description="User-behaviour segments from e-commerce event logs, with evidence of their quality",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"seqclust": ["presets/*.yaml"]},
    install_requires=CORE + ML,
    extras_require={"dev": DEV},
    entry_points={"console_scripts": ["seqclust=seqclust.cli:main"]},
)
