"""The command line: ``gvpo-train`` / ``python -m gvpo_kernels.trainer``, one flag per TrainConfig field.

    gvpo-train                                   # the embedded default: tiny model, built-in task, CPU, minutes
    gvpo-train --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --reward last_number --lr 1e-6 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .config import TrainConfig


def _base_type(hint):
    """str for Optional[str], and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvpo-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Post-train a causal LM with GVPO (arXiv 2504.19599). With no arguments: a tiny model learns "
                    "the built-in addition task on the CPU in a few minutes, nothing downloaded.")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag, kind, help = "--" + field.name.replace("_", "-"), _base_type(hints[field.name]), field.metadata["help"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help)
        elif field.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                                help=help + " (the flag alone means 'latest')")
        else:
            parser.add_argument(flag, type=kind, default=field.default, choices=field.metadata.get("choices"),
                                help=help)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(**vars(args))
    except ValueError as err:
        parser.error(str(err))
    from .loop import train  # after parsing, so that --help answers without importing transformers

    train(config)
