"""Errors against float64 on confident rows, per backend, beside PyTorch's own float32 ("pt32": the reference in
float32): token log-probs (lp), entropy (H), the entropy's gradient (gH) and a weighted log-prob gradient (gLP),
normwise relative; H and gH with a floor of 1e-3 per element (a row's entropy can be ~1e-25 at T = 1e-3).
N 64 x V 1000, logits ~ N(0, (scale / 3)^2), two thirds of the labels the argmax. Triton runs in its interpreter.

    .venv/bin/python scripts/confident_rows.py [torch,cpu,triton]     # ~1 minute
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import gvpo_kernels as gk  # noqa: E402
from gvpo_kernels import reference  # noqa: E402


def rel(a, b, floor=0.0):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), floor * b.numel() ** 0.5, 1e-300)).item()


def stats(backend, logits, labels, temperature):
    """(log-probs, entropy, d sum(H) / d logits, d sum(w lp) / d logits)."""
    x = logits.clone().requires_grad_()
    fn, kw = (reference.token_logprobs, {}) if backend == "ref" else (gk.token_logprobs, dict(backend=backend))
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, entropy = fn(x, labels, temperature=temperature, return_entropy=True, **kw)
    (grad_entropy,) = torch.autograd.grad(entropy.double().sum(), x)
    logprob, entropy = fn(x, labels, temperature=temperature, return_entropy=True, **kw)
    (grad_logprob,) = torch.autograd.grad((logprob.double() * weights).sum(), x)
    return logprob.detach(), entropy.detach(), grad_entropy, grad_logprob


def main(backends):
    torch.manual_seed(0)
    n, v = 64, 1000
    for scale in (10.0, 30.0):
        for temperature in (1e-3, 1e-2, 0.1, 0.3, 1.0):
            logits = torch.randn(n, v) * scale / 3
            labels = logits.argmax(-1)
            labels[::3] = torch.randint(0, v, (len(labels[::3]),))
            logits, labels = logits.view(1, n, v), labels.view(1, n)
            oracle = stats("ref", logits.double(), labels, temperature)
            row = [f"s={scale:g} T={temperature:g}"]
            for name in ["pt32", *backends]:
                got = stats("ref" if name == "pt32" else name, logits, labels, temperature)
                e = [rel(got[i], oracle[i], 1e-3 if i in (1, 2) else 0) for i in range(4)]
                row.append(f"{name}: lp {e[0]:.1e} H {e[1]:.1e} gH {e[2]:.1e} gLP {e[3]:.1e}")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["torch", "cpu", "triton"])
