"""``python -m nbdproto``: the command line."""

import sys

from nbdproto.cli import main

sys.exit(main())
