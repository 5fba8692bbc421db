"""Entry point for the cluster stage (spark-submit, schedulers): `python jobs/cluster.py --run-id ID ...`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
