"""``python -m dapo_pl`` is the ``dapo-pl`` command."""

import sys

from dapo_pl.cli import main

if __name__ == "__main__":
    sys.exit(main())
