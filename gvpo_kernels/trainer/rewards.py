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
import importlib.util
import inspect
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
    """The reward function named by ``spec``: a key of BUILTINS, ``module:function`` (importable from the
    current directory too) or ``path/to/file.py:function``."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor 'module:function' "
                         "or 'file.py:function'")
    is_file = module_name.endswith(".py") or os.sep in module_name
    what = "file" if is_file else "module"
    try:
        module = _import_file(module_name) if is_file else _import_module(module_name)
    except Exception as err:  # a missing file, an ImportError, or an error raised by the module's own code
        raise ValueError(f"reward: cannot import {what} {module_name!r} for {spec!r}: {type(err).__name__}: "
                         f"{err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward: {what} {module_name!r} has no function {attr!r}")
    return fn


def _import_module(name: str):
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(name)


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path!r}")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_fields(fn, name: str, rows: list[dict]) -> None:
    """ValueError unless ``fn`` can be called as :func:`score` will call it on ``rows``: a built-in needs an
    ``answer`` in every row; a user function must accept (prompts, completions) and every field as a keyword."""
    if fn in BUILTINS.values():
        for i, row in enumerate(rows):
            if "answer" not in row:
                raise ValueError(f"data: row {i + 1} has no 'answer', which the built-in reward {name!r} compares "
                                 "the completion with")
        return
    fields = sorted({key for row in rows for key in row} - {"prompt"})
    try:
        inspect.signature(fn).bind(["p"], ["c"], **{key: [None] for key in fields})
    except TypeError as err:
        raise ValueError(f"reward: {name!r} cannot be called as f(prompts, completions, "
                         f"{', '.join(f'{k}=...' for k in fields)}) with this data's fields: {err}") from None
    except ValueError:  # no signature to inspect (a builtin or C function): it is called as it is
        pass


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
