"""Entry point for the evaluate stage (spark-submit, schedulers): `python jobs/evaluate.py --run-id ID ...`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
