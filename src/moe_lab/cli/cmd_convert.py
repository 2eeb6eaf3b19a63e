"""``moe-lab convert``: Hugging Face checkpoint folder <-> moe-lab run directory.

Examples:
    $ moe-lab convert --from-hf ./Mixtral-8x7B-v0.1 --out runs/mixtral
    $ moe-lab convert runs/mixtral-ft --to-hf out/mixtral-ft-hf --max-shard-size 2GB --dtype bfloat16
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from moe_lab.cli.main import CLIError

_DTYPES = ("float32", "bfloat16", "float16")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "convert",
        help="import a Hugging Face checkpoint into a run directory, or export a run to Hugging Face format",
        description="Convert between local Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) "
        "and moe-lab run directories. Nothing is downloaded.",
    )
    p.add_argument("run_dir", nargs="?", help="run directory to export (with --to-hf)")
    p.add_argument("--from-hf", metavar="DIR", help="local Hugging Face checkpoint folder to import")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to create (with --from-hf)")
    p.add_argument("--to-hf", metavar="DIR", help="Hugging Face folder to write (with RUN_DIR)")
    p.add_argument(
        "--family", choices=["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"], help="expected/target family"
    )
    p.add_argument("--checkpoint", metavar="DIR", help="export this checkpoint instead of the newest")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of the export (default 5GB)")
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def _check_local(path: str, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if not p.exists() and _HUB_NAME.match(path) and not path.startswith((".", "/")):
        raise CLIError(
            f"{what} {path!r} is not a local directory; download it first (e.g. huggingface-cli download "
            f"{path} --local-dir ./{path.split('/')[-1]}) and pass the local directory"
        )
    raise FileNotFoundError(f"{what} {path}: directory not found")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except FileExistsError as err:
        raise CLIError(str(err)) from None


def _run(args: argparse.Namespace) -> int:
    import torch

    from moe_lab.interop.rundir import export_run_dir, import_to_run_dir

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.from_hf:
        if args.to_hf or args.run_dir:
            raise CLIError("use either --from-hf DIR --out RUN_DIR or RUN_DIR --to-hf DIR")
        if not args.out:
            raise CLIError("--from-hf needs --out RUN_DIR")
        src = _check_local(args.from_hf, "--from-hf")
        out = import_to_run_dir(src, args.out, family=args.family, dtype=dtype, overwrite=args.overwrite)
        print(f"imported {src} -> {out}")
        return 0
    if args.to_hf:
        if not args.run_dir:
            raise CLIError("--to-hf needs the RUN_DIR to export")
        run_dir = _check_local(args.run_dir, "RUN_DIR")
        out = export_run_dir(
            run_dir,
            args.to_hf,
            family=args.family,
            checkpoint=args.checkpoint,
            max_shard_size=args.max_shard_size,
            dtype=dtype,
            overwrite=args.overwrite,
        )
        print(f"exported {run_dir} -> {out}")
        return 0
    raise CLIError("nothing to do: use --from-hf DIR --out RUN_DIR, or RUN_DIR --to-hf DIR")
