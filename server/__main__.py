"""`python -m server ...` runs the `layerwatch` command line."""

import sys

from server.cli import main

sys.exit(main())
