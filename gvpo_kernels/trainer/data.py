"""Prompts: read them (a JSONL file or the built-in task), pick each step's batch, and turn them into token ids.

A row is a dict with ``prompt`` (str), usually ``answer``, and any other fields; all fields but ``prompt`` reach
the reward function. The batch of a step is a function of (seed, step) alone, so a resumed run sees the same
prompts as an uninterrupted one without any saved state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import tiny


def load_rows(path: str | None, demonstrations: bool = False) -> list[dict]:
    """The rows of the JSONL file at ``path`` (one JSON object per line, blank lines skipped), or the built-in task
    (with its demonstrations when ``demonstrations``)."""
    if path is None:
        return tiny.task_rows(demonstrations)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data: no such file {path!r}")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data: {path}:{number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"data: {path}:{number} must be a JSON object with a string 'prompt'")
        rows.append(row)
    if not rows:
        raise ValueError(f"data: {path} holds no rows")
    return rows


def step_rows(rows: list[dict], step: int, count: int, seed: int) -> list[dict]:
    """The ``count`` rows of ``step``: the rows are walked in a fresh seeded shuffle per pass over the data."""
    orders, picked = {}, []
    for i in range(step * count, (step + 1) * count):
        data_epoch, position = divmod(i, len(rows))
        if data_epoch not in orders:
            orders[data_epoch] = list(range(len(rows)))
            random.Random(f"{seed}:{data_epoch}").shuffle(orders[data_epoch])
        picked.append(rows[orders[data_epoch][position]])
    return picked


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt; wrapped as a user turn in the tokenizer's chat template when it has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]
