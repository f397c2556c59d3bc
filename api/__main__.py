"""`python -m api serve ...` runs the CLI."""

import sys

from api.cli import main

sys.exit(main())
