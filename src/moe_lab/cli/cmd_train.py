"""``moe-lab train``: train a model from a preset and/or YAML config, or resume a run.

Example:
    $ moe-lab train                                   # small preset on the default corpus
    $ moe-lab train --preset tiny --set train.max_steps=100 --set model.num_experts=16
    $ moe-lab train --config configs/train/small.yaml --name my-run --overwrite
    $ moe-lab train --resume runs/my-run --set train.max_steps=2000
    $ moe-lab train --preset small --nproc-per-node 4 --set parallel.expert_parallel=2   # torchrun
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from moe_lab.cli.main import CLIError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="train an MoE language model (default: the small preset on the bundled corpus)",
        description=(
            "Train a model. The run config is the model preset, then --config's sections (model, data, "
            "train), then --set overrides. The run directory <runs-dir>/<name> gets config.yaml, "
            "tokenizer.json, metrics.jsonl, checkpoints/ and summary.json."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="YAML run config with model/data/train sections")
    p.add_argument("--preset", metavar="NAME", help="model preset (tiny, small, ...); default small")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.max_steps=100 --set model.num_experts=16 (repeatable)",
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue this run from its newest complete checkpoint"
    )
    p.add_argument("--name", help="run name (folder under --runs-dir); default train.name or a time stamp")
    p.add_argument(
        "--runs-dir", metavar="DIR", help="folder of run directories (default train.runs_dir: runs)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of that name")
    p.add_argument(
        "--callback",
        dest="callbacks",
        action="append",
        default=[],
        metavar="NAME",
        help="enable a registered callback (router_monitor, run_store, tensorboard, ...); repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the summary")
    d = p.add_argument_group("distributed (runs torchrun; see docs/guides/distributed.md)")
    d.add_argument("--nproc-per-node", type=int, metavar="N", help="processes on this machine")
    d.add_argument("--nnodes", type=int, metavar="M", help="machines in the job (default 1)")
    d.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's index (default 0)")
    d.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port (c10d)")
    p.set_defaults(func=run)


def _fmt_time(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def print_summary(result: Any) -> None:
    """The end-of-training lines (also used by ``python -m moe_lab.train``)."""
    print(f"run: {result.run_dir}")
    print(
        f"steps {result.steps} | tokens {result.tokens:,} | {result.tokens_per_s:,.0f} tok/s | "
        f"wall {_fmt_time(result.wall_time_s)}"
    )
    if result.eval_loss is not None:
        line = f"val loss {result.eval_loss:.4f} (ppl {result.perplexity:.2f})"
        base = result.extra.get("unigram_val_loss")
        if base is not None:
            line += f" | unigram baseline {base:.4f} (ppl {result.extra['unigram_val_perplexity']:.2f})"
        print(line)
    elif result.final_loss is not None:
        print(f"final train loss {result.final_loss:.4f}")


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The arguments each torchrun worker (``python -m moe_lab.train``) gets: all but the launcher's."""
    out: list[str] = []
    for flag, value in (
        ("--config", args.config),
        ("--preset", args.preset),
        ("--resume", args.resume),
        ("--name", args.name),
        ("--runs-dir", args.runs_dir),
    ):
        if value is not None:
            out += [flag, value]
    for item in args.overrides:
        out += ["--set", item]
    for item in args.callbacks:
        out += ["--callback", item]
    return out + [f for f, on in (("--overwrite", args.overwrite), ("--quiet", args.quiet)) if on]


def _launch(args: argparse.Namespace) -> int:
    """Check everything that can be checked here, then run torchrun and return its exit status."""
    from moe_lab.train.checkpoint import latest_checkpoint
    from moe_lab.train.launch import load_run_config, resolve_run_dir
    from moe_lab.train.torchrun import check_launch, check_world, run_torchrun, torchrun_command

    if os.environ.get("WORLD_SIZE") is not None:
        raise CLIError("--nproc-per-node/--nnodes: this process already runs inside a torchrun job")
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    nnodes = 1 if args.nnodes is None else args.nnodes
    check_launch(nproc, nnodes=nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint)
    cfg = _config(args)
    if args.resume:
        cfg = load_run_config(args.resume).with_overrides(list(args.overrides))
        if latest_checkpoint(args.resume) is None:
            raise CLIError(f"no complete checkpoint in {args.resume}/checkpoints to resume from")
    else:
        path = resolve_run_dir(cfg, name=args.name, runs_dir=args.runs_dir)
        if path.exists() and not args.overwrite and (not path.is_dir() or any(path.iterdir())):
            raise CLIError(f"run directory {path} already exists; pass --overwrite to replace it")
    check_world(cfg, nproc * nnodes)
    cmd = torchrun_command(
        _worker_args(args),
        nproc_per_node=nproc,
        nnodes=nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
    )
    return run_torchrun(cmd)


def _config(args: argparse.Namespace) -> Any:
    from moe_lab.train.config import RunConfig

    if args.resume:
        if args.config or args.preset or args.name or args.runs_dir or args.overwrite:
            raise CLIError("--resume takes the config from the run directory; use only --set with it")
        return None
    cfg = RunConfig.load(args.config, args.preset, list(args.overrides))
    if args.callbacks:
        cfg = cfg.with_overrides({"train.callbacks": [*cfg.train.callbacks, *args.callbacks]})
    return cfg


def run(args: argparse.Namespace) -> int:
    from moe_lab.train.callbacks import create_callback
    from moe_lab.train.distributed import is_main_process, world_size_from_env
    from moe_lab.train.launch import resume_run, train_from_config

    if args.nproc_per_node is not None or args.nnodes is not None or args.rdzv_endpoint is not None:
        return _launch(args)
    overrides = list(args.overrides)
    console = not args.quiet
    cfg = _config(args)
    if cfg is not None and world_size_from_env() <= 1 and any(o.startswith("parallel.") for o in overrides):
        print("note: parallel.* applies to several processes; add --nproc-per-node N", file=sys.stderr)
    if args.resume:
        extra = [create_callback(name) for name in args.callbacks]
        result = resume_run(args.resume, overrides=overrides, callbacks=extra, console=console)
    else:
        result = train_from_config(
            cfg, name=args.name, runs_dir=args.runs_dir, overwrite=args.overwrite, console=console
        )
    if is_main_process():
        print_summary(result)
    return 0
