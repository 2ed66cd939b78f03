"""The grids every backend runs against the float64 oracle: the logits path's (tests/test_gvpo_loss.py) and the
linear path's (tests/test_linear.py; tests/test_cpu.py runs it under more chunkings): one factor of a base case
changed at a time (cases.ONE_FACTOR_CHANGES), combinations, and seeded random cases."""

import random

import torch

from .cases import Case, one_factor

BASE = Case()
ONE_FACTOR = one_factor(BASE, dict(inplace=True))
COMBINED = [
    Case(layout="packed", groups=(2, 3, 1, 5), shuffled=True, ignore=True, temperature=0.7, reduction="sum"),
    Case(layout="packed", dtype=torch.bfloat16, inplace=True, vocab=3001, mask="empty"),
    Case(groups=(2, 3, 1, 5), dtype=torch.float16, anchor=False, mask="empty", sliced=True, inplace=True),
    Case(layout="packed", groups=(1,), seq_len=1, mask="none", beta=1.0),
    Case(mask="none", ignore=True, temperature=0.7, beta=1.0, inplace=True, dtype=torch.bfloat16),
    Case(layout="packed", vocab=1, anchor=False, reduction="sum"),
    Case(seq_len=1, groups=(2, 3, 1, 5), shuffled=True, sliced=True, dtype=torch.bfloat16, temperature=0.7),
]


def random_cases(count: int, seed: int):
    rng = random.Random(seed)
    choices = dict(
        layout=["padded", "packed"], groups=[(1,), (2,), (4, 4), (2, 3, 1, 5)], shuffled=[False, True],
        vocab=[1, 257, 3001], seq_len=[1, 63], mask=["none", "random", "empty"], anchor=[False, True],
        temperature=[1.0, 0.7], reduction=["mean", "sum"], beta=[0.1, 1.0],
        dtype=[torch.float32, torch.bfloat16, torch.float16], ignore=[False, True], sliced=[False, True],
        inplace=[False, True],
    )
    return [Case(seed=seed + i, **{k: rng.choice(v) for k, v in choices.items()}) for i in range(count)]


CASES = ONE_FACTOR + COMBINED + random_cases(10, seed=1234)


LINEAR_BASE = Case(hidden_size=64, vocab=257, seq_len=17)
LINEAR_CASES = one_factor(LINEAR_BASE, dict(hidden_size=16), dict(hidden_size=96), dict(bias=True)) + [
    Case(hidden_size=96, bias=True, layout="packed", groups=(2, 3, 1, 5), shuffled=True, ignore=True,
         temperature=0.7, reduction="sum", vocab=1000),
    Case(hidden_size=16, bias=True, dtype=torch.bfloat16, sliced=True, mask="empty", vocab=3001, seq_len=9),
    Case(hidden_size=64, dtype=torch.float16, anchor=False, groups=(2, 3, 1, 5), seq_len=1, beta=1.0),
]
