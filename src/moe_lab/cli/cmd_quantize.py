"""``moe-lab quantize RUN_DIR|MODEL_DIR --bits 8 -o OUT``: weight-only int8/int4 experts, saved to disk.

Quantises every MoE layer's experts (routers, norms, attention and embeddings stay in full precision unless
``--quantize-router``), measures the perplexity of the model before and after on the same tokens, and writes
the quantised model (with the source's tokenizer) to ``OUT``, which ``moe-lab trace``, ``moe-lab bench
generate`` and :func:`moe_lab.inference.load_model` read.

Example:
    $ moe-lab quantize runs/demo --bits 8 -o runs/demo-int8
    $ moe-lab quantize runs/demo --bits 4 --group-size 64 --data default --eval-tokens 32768 -o runs/demo-int4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from moe_lab.cli.main import CLIError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "quantize",
        help="weight-only int8/int4 quantisation of the experts; reports the perplexity change; saves",
        description=(
            "Quantise a model's routed experts (int8 per output channel, or int4 in groups), measure the "
            "perplexity before and after on the same tokens, and save the quantised model to -o."
        ),
    )
    p.add_argument("model", metavar="RUN_DIR|MODEL_DIR", help="a run dir, a moe-lab model dir or an HF dir")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8 (per channel) or 4 (groups)")
    p.add_argument("--group-size", type=int, default=None, metavar="G", help="int4 group size (default 64)")
    p.add_argument(
        "--quantize-router", action="store_true", help="also round the router gates to int8 (to measure it)"
    )
    p.add_argument(
        "--data",
        default="default",
        metavar="PATH|default",
        help="text for the perplexity check: a file or folder, or 'default' (the bundled corpus)",
    )
    p.add_argument(
        "--eval-tokens", type=int, default=16384, metavar="N", help="tokens of the check (0: skip)"
    )
    p.add_argument("--seq-len", type=int, default=256, metavar="S", help="sequence length of the check")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_lab.cli.cmd_trace import find_tokenizer, token_batches
    from moe_lab.inference.optimized import OptimizedMoEModel, load_model, perplexity

    path, out = Path(args.model), Path(args.output)
    if not path.is_dir():
        raise CLIError(f"model directory not found: {path} (a run dir, a moe-lab model dir or an HF dir)")
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    if args.group_size is not None and (args.bits != 4 or args.group_size < 2 or args.group_size % 2):
        raise CLIError(
            f"--group-size applies to --bits 4 and must be an even integer >= 2, got {args.group_size}"
        )
    if args.eval_tokens < 0 or args.seq_len < 1:
        raise CLIError("--eval-tokens must be >= 0 and --seq-len >= 1")
    model = load_model(path)
    model.eval()
    if not model.moe_layers():
        raise CLIError(f"{path}: the model has no MoE layers, so there are no experts to quantise")
    if getattr(model, "quantization", None) is not None:
        raise CLIError(f"{path} is already quantised ({model.quantization['bits']}-bit)")
    cfg = model.config
    tok, note = find_tokenizer(path)
    batches = []
    if args.eval_tokens:
        if note:
            print(note)
        seq_len = min(args.seq_len, int(cfg.max_seq_len))
        batches = token_batches(tok, note, args.data, int(cfg.vocab_size), seq_len, args.eval_tokens, 4)
    opt = OptimizedMoEModel(model)
    full_bytes = opt.expert_weight_bytes()
    with torch.no_grad():
        before = perplexity(model, batches) if batches else None
        try:
            opt.quantize(bits=args.bits, group_size=args.group_size, quantize_router=args.quantize_router)
        except ValueError as err:
            raise CLIError(f"--group-size: {err}") from None
        after = perplexity(model, batches) if batches else None
    extra = {}
    if note is None:  # the source's own tokenizer travels with the model
        with tempfile.TemporaryDirectory() as tmp:
            extra["tokenizer.json"] = Path(tok.save(tmp)).read_text(encoding="utf-8")
    written = opt.save_quantized(out, extra_files=extra)
    q_bytes = opt.expert_weight_bytes()
    print(
        f"experts: {full_bytes / 2**20:.1f} MiB -> {q_bytes / 2**20:.1f} MiB ({full_bytes / q_bytes:.2f}x smaller)"
    )
    if before is not None and after is not None:
        tokens = sum(int(b[:, 1:].numel()) for b in batches)
        print(
            f"perplexity on {tokens:,} tokens of {args.data}: {before:.3f} -> {after:.3f} "
            f"({100 * (after / before - 1):+.2f}%)"
        )
    print(f"wrote {written}")
    return 0
