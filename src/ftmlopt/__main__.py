"""``python -m ftmlopt``: see :mod:`ftmlopt.cli`."""

import sys

from ftmlopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
