"""The command line: ``gvpo-train`` / ``python -m gvpo_kernels.trainer``, one flag per TrainConfig field.

    gvpo-train                                   # the embedded default: tiny model, built-in task, CPU, ~30 s
    gvpo-train --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --reward last_number --lr 1e-6 ...
    torchrun --nproc-per-node 8 -m gvpo_kernels.trainer --model ... [--fsdp]      # data parallel

A setting that cannot work (a flag's value, the data, reward, model path and its logit transform, device, backend,
output dir, resume) is one line on stderr and exit status 2, before any model is loaded (a model whose own logits
are not what its config says: when it loads, before the first step); a checkpoint that cannot be written or read
is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from .config import TrainConfig


def _base_type(hint):
    """str for Optional[str], and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag or value is one line on stderr (exit status 2), like every other error."""

    def error(self, message: str):
        fail(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gvpo-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Post-train a causal LM with GVPO (arXiv 2504.19599). With no arguments: a tiny model learns "
                    "the built-in addition task on the CPU in about 30 s, nothing downloaded. On several "
                    "processes: torchrun --nproc-per-node N -m gvpo_kernels.trainer ...")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag, kind = "--" + field.name.replace("_", "-"), _base_type(hints[field.name])
        help = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help)
        elif field.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                                help=help + " (the flag alone means 'latest')")
        else:
            parser.add_argument(flag, type=kind, default=field.default, choices=field.metadata.get("choices"),
                                help=help)
    return parser


def fail(message: str, status: int = 2) -> None:
    """One line on stderr (rank 0 only, under torchrun), then exit: status 2 for a setting that cannot work, 1 for
    a run that stopped (a checkpoint that cannot be written or read)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"gvpo-train: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = TrainConfig(**vars(args))
    except (TypeError, ValueError) as err:
        fail(str(err))
    from .checkpoint import CheckpointError  # after parsing: --help answers without importing transformers
    from .checks import ConfigError
    from .loop import train

    try:
        train(config)
    except ConfigError as err:  # raised by the checks that run before any model is loaded
        fail(str(err))
    except CheckpointError as err:  # a checkpoint that could not be written (disk full) or read
        fail(str(err), status=1)
