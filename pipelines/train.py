"""`python -m trainyard.pipelines.train CONFIG [...]` is `trainyard train CONFIG [...]`."""

import sys

from trainyard.pipelines.cli import main
from trainyard.pipelines.driver.startup import process_started

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], started=process_started()))
