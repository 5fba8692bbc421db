# Databricks notebook source
# MAGIC %md
# MAGIC # seqclust: run the pipeline (or one stage)
# MAGIC
# MAGIC Thin on purpose: the widgets become the `seqclust` command line and the library does the
# MAGIC rest with this notebook's Spark session (Delta comes with the runtime; tables go to
# MAGIC Unity Catalog as `catalog.schema.<table>` when `catalog`/`schema` are set).
# MAGIC The cluster needs the seqclust wheel (the bundle's job installs it; interactively:
# MAGIC `%pip install /Workspace/.../seqclust-*.whl`). The run id defaults to the run date, so
# MAGIC rerunning a date replaces that run's rows.

# COMMAND ----------

from seqclust.app.notebook import create_widgets, run_notebook

create_widgets(dbutils)  # noqa: F821 - dbutils is a Databricks global

# COMMAND ----------

run_id = run_notebook(dbutils)  # noqa: F821

# COMMAND ----------

# MAGIC %md
# MAGIC The run record: status, row counts (input = clean + quarantined + duplicates), stage timings.

# COMMAND ----------

from seqclust.app.notebook import open_run

cfg, store, _ = open_run(dbutils.widgets.get)  # noqa: F821
display(store.read(spark, cfg.tables.runs, run_id))  # noqa: F821 - display, spark: Databricks globals

# COMMAND ----------

dbutils.notebook.exit(run_id)  # noqa: F821
