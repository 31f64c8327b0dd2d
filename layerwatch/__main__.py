"""`python -m layerwatch ...` runs the `layerwatch` command line (serve, demo, diagnose, upload, webhook)."""

import sys

from layerwatch.server.cli import main

sys.exit(main())
