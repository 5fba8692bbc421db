"""Entry point for the embed stage (spark-submit, schedulers): `python jobs/embed.py --run-id ID ...`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
