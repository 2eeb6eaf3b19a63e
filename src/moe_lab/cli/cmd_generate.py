"""``moe-lab generate RUN_DIR|MODEL_DIR --prompt TEXT``: sample a continuation from a trained run or a model
directory (a moe-lab model dir, a quantised one written by ``moe-lab quantize``, or a Hugging Face dir).

Example:
    $ moe-lab generate runs/demo --prompt "def main(" --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 0
    $ moe-lab generate runs/demo-int8 --prompt "def main(" --temperature 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "generate",
        help="generate text from a trained run or a model directory",
        description=(
            "Generate a continuation of --prompt (KV cache) with the newest checkpoint of a run, or with a "
            "model directory (moe-lab, quantised or Hugging Face) and the tokenizer.json beside it."
        ),
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR|MODEL_DIR",
        help="a run directory written by `moe-lab train`, or a model directory",
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampling (reproducible)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the generated text contains TEXT (repeatable; the output ends before it)",
    )
    p.add_argument(
        "--stop-token-id",
        action="append",
        type=int,
        default=[],
        metavar="ID",
        help="stop after generating this token id (repeatable; besides the tokenizer's eos)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="a specific checkpoint folder (default: the newest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_lab.cli.main import CLIError
    from moe_lab.inference.generate import generate
    from moe_lab.train.launch import load_run_model

    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    path = Path(args.run_dir)
    if not path.exists():
        raise CLIError(f"not found: {path} (a run directory or a model directory)")
    if (path / "checkpoints").is_dir() or args.checkpoint or not path.is_dir():
        model, _, tok, _ = load_run_model(args.run_dir, checkpoint=args.checkpoint)
    else:  # a model directory: its own tokenizer.json, else bytes
        from moe_lab.cli.cmd_trace import find_tokenizer
        from moe_lab.inference.optimized import load_model

        model = load_model(path)
        model.eval()
        tok, note = find_tokenizer(path)
        if note:
            print(note, file=sys.stderr)
    ids = tok.encode(args.prompt)
    if not ids:
        ids = [tok.bos_token_id]
    vocab = int(model.config.vocab_size)
    if max(ids) >= vocab:
        raise CLIError(
            f"the prompt encodes to id {max(ids)} but the model's vocab_size is {vocab}: "
            f"tokenizer {getattr(tok, 'name', '?')} does not belong to this model"
        )
    out = generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        stop_strings=args.stop,
        stop_token_ids=args.stop_token_id,
        tokenizer=tok if args.stop else None,
    )
    text = tok.decode(out.new_tokens[0])
    cuts = [text.find(st) for st in args.stop if st and st in text]
    print(args.prompt + (text[: min(cuts)] if cuts else text))
    return 0
