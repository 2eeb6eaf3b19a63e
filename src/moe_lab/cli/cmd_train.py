"""``moe-lab train``: train a model from a preset and/or YAML config, or resume a run.

Example:
    $ moe-lab train                                   # small preset on the default corpus
    $ moe-lab train --preset tiny --set train.max_steps=100 --set model.num_experts=16
    $ moe-lab train --config configs/train/small.yaml --name my-run --overwrite
    $ moe-lab train --resume runs/my-run --set train.max_steps=2000
"""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> int:
    from moe_lab.train.callbacks import create_callback
    from moe_lab.train.config import RunConfig
    from moe_lab.train.launch import resume_run, train_from_config

    overrides = list(args.overrides)
    console = not args.quiet
    if args.resume:
        if args.config or args.preset or args.name or args.runs_dir or args.overwrite:
            raise CLIError("--resume takes the config from the run directory; use only --set with it")
        extra = [create_callback(name) for name in args.callbacks]
        result = resume_run(args.resume, overrides=overrides, callbacks=extra, console=console)
    else:
        cfg = RunConfig.load(args.config, args.preset, overrides)
        if args.callbacks:
            cfg = cfg.with_overrides({"train.callbacks": [*cfg.train.callbacks, *args.callbacks]})
        result = train_from_config(
            cfg, name=args.name, runs_dir=args.runs_dir, overwrite=args.overwrite, console=console
        )
    print_summary(result)
    return 0
