"""Where the job runs: the Spark session, table storage, the run lease and experiment tracking."""
