"""``moe-lab eval RUN_DIR``: validation loss and perplexity of a trained run.

Example:
    $ moe-lab eval runs/demo
    $ moe-lab eval runs/demo --data my_texts/ --max-batches 50 --json
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "eval",
        help="loss and perplexity of a trained run on its validation split or other data",
        description="Evaluate the newest checkpoint of a run (next-token loss in nats/token, perplexity).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `moe-lab train`")
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="text/JSONL/parquet file, glob or folder (default: the run's val split)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="a specific checkpoint folder (default: the newest)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N", help="evaluate at most N batches")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="sequences per batch (default train.batch_size)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_lab.cli.main import CLIError
    from moe_lab.data import build_datasets
    from moe_lab.train.launch import load_run_model
    from moe_lab.train.trainer import MoETrainer

    model, cfg, tok, ckpt = load_run_model(args.run_dir, checkpoint=args.checkpoint)
    if args.data:
        data_cfg = cfg.data.with_overrides({"source": args.data, "format": "auto", "val_fraction": 0.0})
        data, _, _ = build_datasets(data_cfg, tokenizer=tok)
        where = args.data
    else:
        _, data, _ = build_datasets(cfg.data, tokenizer=tok)
        where = "validation split"
    if data is None or (hasattr(data, "__len__") and len(data) == 0):
        raise CLIError(
            f"no evaluation sequences in {where} (need at least data.seq_len={cfg.data.seq_len} tokens)"
        )
    trainer = MoETrainer(
        model, cfg.train, device="cpu" if cfg.train.device == "auto" else cfg.train.device, console=False
    )
    res = trainer.evaluate(data, max_batches=args.max_batches, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({**res.to_dict(), "checkpoint": str(ckpt), "data": where}))
    else:
        print(f"{ckpt} on {where}: loss {res.loss:.4f} | ppl {res.perplexity:.2f} | tokens {res.tokens:,}")
    return 0
