"""``python -m crossgap_fast``: the ``crossgap`` command line."""

import sys

from crossgap_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
