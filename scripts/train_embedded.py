"""Train the embedded shapes-world models (resumable). Same as `hmine train-embedded`."""

import sys

from hmine.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-embedded", *sys.argv[1:]]))
