"""Entry point for the train stage (spark-submit, schedulers): `python jobs/train.py --run-id ID ...`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
