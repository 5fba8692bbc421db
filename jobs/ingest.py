"""Entry point for the ingest stage (spark-submit, schedulers): `python jobs/ingest.py --run-id ID ...`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
