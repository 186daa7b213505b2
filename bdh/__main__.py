"""`python -m bdh ...` runs the bdh command line."""

import sys

from bdh.cli import main

sys.exit(main())
