"""``moe-lab trace RUN_DIR|MODEL_DIR --data PATH|default -o trace.safetensors``: record a routing trace.

The trace (which experts each token used in each MoE layer) feeds ``moe-lab cache-sim``.

Example:
    $ moe-lab trace runs/demo --data default --max-tokens 4096 -o trace.safetensors
    $ moe-lab cache-sim trace.safetensors --capacity 2,4
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moe_lab.cli.main import CLIError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "trace",
        help="record a routing trace (experts per token per MoE layer) for cache-sim",
        description=(
            "Run a model over text and record, token by token, the experts each MoE layer selected. "
            "Writes safetensors (expert_indices [N, L, K], weights [N, L, K])."
        ),
    )
    p.add_argument("model", metavar="RUN_DIR|MODEL_DIR", help="a run dir, a moe-lab model dir or an HF dir")
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH|default",
        help="a text/JSONL/parquet file or folder, or 'default' for the bundled corpus",
    )
    p.add_argument("--max-tokens", type=int, default=8192, metavar="N", help="tokens to trace (default 8192)")
    p.add_argument("--seq-len", type=int, default=256, metavar="S", help="sequence length (default 256)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="sequences per forward pass")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file to write (.safetensors)")
    p.set_defaults(func=run)


def find_tokenizer(path: Path) -> tuple[Any, str | None]:
    """The run's tokenizer, else the byte tokenizer with a note saying so."""
    from moe_lab.data import ByteTokenizer, load_tokenizer

    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path), None
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        try:
            from moe_lab.train.launch import load_run_tokenizer

            return load_run_tokenizer(path), None
        except (ImportError, FileNotFoundError):
            pass
    return ByteTokenizer(), f"note: no tokenizer found in {path}; using the byte tokenizer (ids 0-259)"


def _documents(data: str) -> Any:
    from moe_lab.data import DocumentSource, default_corpus

    if data == "default":
        return default_corpus(max_bytes=2_000_000)
    p = Path(data)
    if not p.exists():
        raise CLIError(f"--data: not found: {p} (a text/JSONL/parquet file or folder, or 'default')")
    return DocumentSource(str(p))


def token_batches(
    tok: Any, note: str | None, data: str, vocab_size: int, seq_len: int, max_tokens: int, batch_size: int
) -> list[Any]:
    """``data`` (a file/folder or ``"default"``) tokenised with ``tok`` (``note``: the fallback message of
    :func:`find_tokenizer`, None for the model's own tokenizer) and cut into ``[B, seq_len]`` batches of
    about ``max_tokens`` tokens; :class:`CLIError` when it cannot be."""
    import torch

    from moe_lab.data import pack_documents

    docs = _documents(data)
    packed = pack_documents(docs, tok, seq_len)
    seqs = torch.from_numpy(packed.sequences).long()
    if seqs.shape[0] == 0:
        raise CLIError(f"--data {data}: fewer than --seq-len={seq_len} tokens of text")
    if note and int(seqs.max()) >= vocab_size:
        # fallback byte tokenizer on a byte-vocab model (256 ids): drop the special ids (eos between
        # documents) that the model cannot embed, and re-cut the stream
        flat = seqs.reshape(-1)
        keep = flat[flat < vocab_size]
        print(f"note: dropped {flat.numel() - keep.numel()} special-token ids >= vocab_size {vocab_size}")
        seqs = keep[: keep.numel() // seq_len * seq_len].reshape(-1, seq_len)
        if seqs.shape[0] == 0:
            raise CLIError(f"--data {data}: fewer than --seq-len={seq_len} tokens of text")
    seqs = seqs[: -(-max_tokens // seq_len)]
    if int(seqs.max()) >= vocab_size:
        raise CLIError(
            f"tokenizer {getattr(tok, 'name', '?')} produces id {int(seqs.max())} but the model's vocab_size "
            f"is {vocab_size}: the tokenizer does not belong to this model"
        )
    return list(seqs.split(batch_size))


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_lab.inference.optimized import load_model
    from moe_lab.inference.trace import record_trace, save_trace

    for flag, value in (
        ("--max-tokens", args.max_tokens),
        ("--seq-len", args.seq_len),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    path = Path(args.model)
    if not path.exists():
        raise CLIError(f"model directory not found: {path} (a run dir, a moe-lab model dir or an HF dir)")
    if not path.is_dir():
        raise CLIError(f"{path} is not a directory (expected a run dir, a moe-lab model dir or an HF dir)")
    model = load_model(path)
    cfg = model.config
    if not model.moe_layers():
        raise CLIError(f"{path}: the model has no MoE layers, so there is no routing to trace")
    seq_len = min(args.seq_len, int(cfg.max_seq_len))
    tok, note = find_tokenizer(path)
    if note:
        print(note)
    batches = token_batches(
        tok, note, args.data, int(cfg.vocab_size), seq_len, args.max_tokens, args.batch_size
    )
    with torch.no_grad():
        trace = record_trace(model, batches, max_tokens=args.max_tokens)
    trace.metadata.update({"model": str(path), "data": str(args.data), "seq_len": seq_len})
    out = save_trace(trace, args.output)
    print(
        f"trace: {trace.num_tokens} tokens x {trace.num_layers} MoE layers x {trace.top_k} slots "
        f"({trace.num_experts} experts per layer) -> {out}"
    )
    return 0
