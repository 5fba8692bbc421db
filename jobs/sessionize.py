"""Entry point for the sessionize stage (spark-submit, schedulers): `python jobs/sessionize.py --run-id ID ...`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["sessionize", *sys.argv[1:]]))
