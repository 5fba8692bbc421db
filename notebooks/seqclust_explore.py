# Databricks notebook source
# MAGIC %md
# MAGIC # seqclust: look at a run's segments and how good they are
# MAGIC
# MAGIC Reads the Delta tables of one run: the segment profiles, every metric beside its
# MAGIC baselines (`bag_of_events`, `random`) and the segment tree's leaves (`leaf`), and the
# MAGIC next-session recommendation figures.

# COMMAND ----------

from seqclust.app.notebook import create_widgets

create_widgets(dbutils)  # noqa: F821 - dbutils is a Databricks global

# COMMAND ----------

from pyspark.sql import functions as F

from seqclust.app.notebook import open_run

cfg, store, run_id = open_run(dbutils.widgets.get)  # noqa: F821

# COMMAND ----------

from seqclust.segment.cluster import at_level

# the top level; at_level(..., "leaf") gives the segment tree's leaves
profiles = at_level(store.read(spark, cfg.tables.cluster_profiles, run_id), "top").orderBy("cluster_id")  # noqa: F821
display(profiles.select("cluster_id", "size", "share", "conversion_rate", "description"))  # noqa: F821

# COMMAND ----------

metrics = store.read(spark, cfg.tables.metrics, run_id).where(F.col("family") != "sweep")  # noqa: F821
beside = metrics.groupBy("family", "metric").pivot("method", ["encoder", "leaf", "bag_of_events", "random"]).agg(F.first("value"))
display(beside.orderBy("family", "metric"))  # noqa: F821

# COMMAND ----------

sweep = store.read(spark, cfg.tables.metrics, run_id).where(F.col("family") == "sweep")  # noqa: F821
display(sweep.groupBy("k").pivot("metric").agg(F.first("value")).orderBy("k"))  # noqa: F821
