"""``python -m moglstm``: the same command line as the ``moglstm`` script."""

import sys

from moglstm.cli import main

if __name__ == "__main__":
    sys.exit(main())
