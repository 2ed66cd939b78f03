r"""Rewards: built-in verifiable checkers, user functions named ``module:function``, and the check of their output.

A reward function takes ``(prompts, completions, **row)``: two lists of n strings and, for every field of the
data rows other than ``prompt`` (``answer`` and any extras), a list of n values, one per completion. It returns
n finite numbers. The built-ins return 1.0 or 0.0:

    exact_match   the completion's final answer (the text after its last "####", else all of it) equals the answer
    last_number   the last number in the completion equals the answer
    boxed         the content of the completion's last \boxed{...} equals the answer

Answers compare by value when both sides are numbers ("1,000" == "1000.0"), else as whitespace-normalised text.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import sys

import torch

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _same(text: str | None, answer) -> bool:
    if text is None or answer is None:
        return False
    a, b = (" ".join(str(x).strip().strip("$").rstrip(".").split()) for x in (text, answer))
    try:
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
    except ValueError:
        return a == b
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


def final_answer(text: str) -> str:
    """The text after the last '####' (GSM8K's answer marker), or the whole text."""
    return text.rsplit("####", 1)[-1]


def last_number_in(text: str) -> str | None:
    """The last number written in ``text`` ("-3", "1,000", "2.5"), or None."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


def exact_match(prompts, completions, answer, **row) -> list[float]:
    """1.0 where the completion's final answer equals ``answer``."""
    return [float(_same(final_answer(c), a)) for c, a in zip(completions, answer)]


def last_number(prompts, completions, answer, **row) -> list[float]:
    """1.0 where the last number in the completion equals ``answer``."""
    return [float(_same(last_number_in(c), a)) for c, a in zip(completions, answer)]


def boxed(prompts, completions, answer, **row) -> list[float]:
    r"""1.0 where the content of the completion's last ``\boxed{}`` equals ``answer``."""
    return [float(_same(last_boxed(c), a)) for c, a in zip(completions, answer)]


BUILTINS = {"exact_match": exact_match, "last_number": last_number, "boxed": boxed}


def load_reward(spec: str):
    """The reward function named by ``spec``: a key of BUILTINS or ``module:function`` (importable from the
    current directory too)."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor 'module:function'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward: cannot import module {module_name!r} for {spec!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward: module {module_name!r} has no function {attr!r}")
    return fn


def score(fn, name: str, prompts: list[str], completions: list[str], rows: list[dict]) -> torch.Tensor:
    """Call reward function ``fn`` (called ``name`` in errors) on n completions; (n,) float32 rewards.

    Raises ValueError / TypeError naming the function when it fails, returns the wrong number of values, a value
    that is not a real number, or NaN / infinity.
    """
    fields = {key for row in rows for key in row} - {"prompt"}
    columns = {key: [row.get(key) for row in rows] for key in sorted(fields)}
    try:
        values = fn(prompts, completions, **columns)
    except Exception as err:
        raise RuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"reward function {name!r} returned a {type(values).__name__}, expected a list of "
                        f"{len(completions)} floats") from None
    if len(values) != len(completions):
        raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                         "completions, expected one per completion")
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real):
            raise TypeError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) for completion "
                            f"{i}, expected a float")
        if not math.isfinite(value):
            raise ValueError(f"reward function {name!r} returned {value} for completion {i}, expected a finite "
                             "number")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
