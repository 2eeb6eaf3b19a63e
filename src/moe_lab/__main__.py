"""``python -m moe_lab`` runs the CLI."""

import sys

from moe_lab.cli.main import main

sys.exit(main())
