"""``moe-lab info PRESET|CONFIG.yaml``: parameters, active parameters, FLOPs per token and layer layout.

A CONFIG is a model config (the fields of ``ModelConfig``, or a ``model:`` section) or a run config as
``moe-lab train --config`` takes it (``preset:``, ``model:``, ``data:``, ``train:`` ...).

Example:
    $ moe-lab info small
    $ moe-lab info small --set model.num_experts=16
    $ moe-lab info configs/train/small.yaml
    $ moe-lab info configs/olmoe-like.yaml --set num_experts=32 --seq-len 512 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_lab.cli.main import CLIError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "info",
        help="show a model's size: parameters, active parameters per token, FLOPs per token, layers",
        description=(
            "Summarise a model preset, a model config or a run config (its model) without allocating it."
        ),
    )
    p.add_argument(
        "model", help="preset name, a model config YAML or a run config YAML (moe-lab train --config)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model field, e.g. --set model.num_experts=16 or num_experts=16 (repeatable)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="context length for FLOPs (default max_seq_len)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


RUN_SECTIONS = {"preset", "model", "data", "train", "parallel", "inference", "name", "seed"}
"""Top-level keys that make a YAML file a run config rather than a bare model config."""


def _model_overrides(overrides: list[str]) -> list[str]:
    """``model.num_experts=16`` and ``num_experts=16`` both override the model; other sections are refused."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model."):
            item = item.strip()[len("model.") :]
        elif "." in key and key.split(".", 1)[0] in RUN_SECTIONS:
            raise CLIError(
                f"--set {item}: info only describes the model; use model.* keys (or bare field names)"
            )
        out.append(item)
    return out


def _load_config(spec: str):  # type: ignore[no-untyped-def]
    import yaml

    from moe_lab.config import ConfigError, yaml_error_text
    from moe_lab.models import ModelConfig, get_preset, list_presets

    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {yaml_error_text(err)}") from None
        if isinstance(data, dict) and RUN_SECTIONS & set(data):  # a run config: the trainer's reading of it
            from moe_lab.train.config import RunConfig

            try:
                return RunConfig.load(config_file=str(path)).model, str(path)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
        try:
            return ModelConfig.from_dict(data), str(path)
        except ConfigError as err:
            raise ConfigError(f"{path}: model: {err}") from None
    if spec not in list_presets():
        raise CLIError(f"unknown preset {spec!r} (and no such file); presets: {', '.join(list_presets())}")
    return get_preset(spec), f"preset {spec}"


def run(args: argparse.Namespace) -> int:
    from moe_lab.models.summary import format_summary, model_summary

    cfg, title = _load_config(args.model)
    if args.overrides:
        cfg = cfg.with_overrides(_model_overrides(args.overrides))
    if args.seq_len is not None and args.seq_len < 1:
        raise CLIError(f"--seq-len must be >= 1, got {args.seq_len}")
    summary = model_summary(cfg, args.seq_len)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, title))
    return 0
