"""``python -m moe_lab.train [--config FILE] [--preset NAME] [--set k=v ...] [--resume RUN_DIR] ...``

The same as ``moe-lab train`` (see ``moe-lab train --help``).
"""

from __future__ import annotations

import sys

from moe_lab.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
