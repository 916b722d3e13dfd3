"""`python -m trainyard.pipelines ...` is the `trainyard` command."""

import sys

from trainyard.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
