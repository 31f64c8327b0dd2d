"""`python -m layerwatch.server ...` runs the `layerwatch` command line too (as `python -m layerwatch`)."""

import sys

from layerwatch.server.cli import main

sys.exit(main())
