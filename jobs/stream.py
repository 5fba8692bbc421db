"""Entry point for live segments (spark-submit, schedulers): `python jobs/stream.py --model RUN_ID --input PATH --checkpoint DIR ...`.

A long-lived job: run it under a supervisor that restarts it (it resumes from --checkpoint)."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["stream", *sys.argv[1:]]))
