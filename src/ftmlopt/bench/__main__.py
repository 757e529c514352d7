"""``python -m ftmlopt.bench``: the same as ``ftmlopt bench``."""

import sys

from ftmlopt.bench import main

if __name__ == "__main__":
    sys.exit(main())
