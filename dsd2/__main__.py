"""`python -m dsd2 ...` is `dsd2-engine ...`."""

import sys

from dsd2.cli import main

sys.exit(main())
