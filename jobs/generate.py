"""Entry point for the data generator: same arguments as `seqclust generate`."""

import sys

from seqclust.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
