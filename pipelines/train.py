"""`python -m trainyard.pipelines.train CONFIG [...]` is `trainyard train CONFIG [...]`."""

import sys

from trainyard.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
