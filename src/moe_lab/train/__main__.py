"""``python -m moe_lab.train [--config FILE] [--preset NAME] [--set k=v ...] [--resume RUN_DIR] ...``

The same as ``moe-lab train`` (see ``moe-lab train --help``). This is also the worker that
``torchrun -m moe_lab.train`` starts on every rank: a worker ends with :func:`moe_lab.parallel.shutdown`
on success, and exits non-zero at once (its error printed) on failure, so torchrun stops the others.
"""

from __future__ import annotations

import sys
import traceback

from moe_lab.cli.main import main
from moe_lab.train.distributed import finish_process, world_size_from_env


def _worker(argv: list[str]) -> int:
    try:
        return main(["train", *argv])
    except SystemExit as err:  # argparse
        return err.code if isinstance(err.code, int) else 2
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    if world_size_from_env() <= 1:
        sys.exit(main(["train", *sys.argv[1:]]))
    finish_process(_worker(sys.argv[1:]))
