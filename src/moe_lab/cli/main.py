"""Entry point of the ``moe-lab`` command.

Subcommands are discovered from the modules ``moe_lab.cli.cmd_*``: each defines
``register(subparsers) -> None`` that adds its parser and sets ``func=handler`` where
``handler(args) -> int``. The CLI stays thin: parse, call the library, print.

Errors the user can fix (bad config, missing file, ...) are raised as :class:`CLIError`,
:class:`moe_lab.config.ConfigError`, ``FileNotFoundError`` or ``ValueError`` and end with exit status 2 and one
line on stderr, never a traceback. Set ``MOE_LAB_DEBUG=1`` to see the traceback.

Example:
    $ moe-lab info tiny
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from moe_lab.config import ConfigError

__all__ = ["CLIError", "build_parser", "main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _version() -> str:
    try:
        from moe_lab import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - broken install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every discovered subcommand."""
    parser = argparse.ArgumentParser(
        prog="moe-lab",
        description="Open MoE Trainer Lab: train, analyse, fine-tune, optimise and serve MoE language models.",
    )
    parser.add_argument("--version", action="version", version=f"moe-lab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import moe_lab.cli as cli_pkg

    for mod in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if not mod.name.startswith("cmd_"):
            continue
        module = importlib.import_module(f"moe_lab.cli.{mod.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 1 unexpected failure)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (
        CLIError,
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        ValueError,
    ) as err:
        if os.environ.get("MOE_LAB_DEBUG"):
            raise
        msg = str(err) or type(err).__name__
        print(f"moe-lab {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-lab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # re-import: run as a script this module is `__main__`, and its CLIError would not be the one
    # that the subcommands raise (they import moe_lab.cli.main)
    from moe_lab.cli.main import main as _main

    sys.exit(_main())
