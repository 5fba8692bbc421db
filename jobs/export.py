"""Entry point for audience export: same arguments as `seqclust export`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
