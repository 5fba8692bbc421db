"""Entry point for the whole pipeline: same arguments as `seqclust run`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
