"""Demo: the fused GVPO loss and its gradient on random data, with per-group statistics.

    python -m gvpo_kernels.demo [--prompts 3] [--k 4] [--seq-len 48] [--vocab 5000] [--backend auto]
"""

import argparse

import torch

import gvpo_kernels as gk


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3, help="number of groups (prompts)")
    parser.add_argument("--k", type=int, default=4, help="sampled responses per prompt (group size)")
    parser.add_argument("--seq-len", type=int, default=48, help="tokens per response")
    parser.add_argument("--vocab", type=int, default=5000, help="vocabulary size")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_seqs = args.prompts * args.k
    logits = torch.randn(num_seqs, args.seq_len, args.vocab, device=device, requires_grad=True)
    labels = torch.randint(0, args.vocab, (num_seqs, args.seq_len), device=device)
    lengths = torch.randint(args.seq_len // 4, args.seq_len + 1, (num_seqs, 1), device=device)
    mask = torch.arange(args.seq_len, device=device) < lengths  # responses of different lengths
    old_logprobs = torch.log_softmax(logits.detach() + 0.3 * torch.randn_like(logits), -1).gather(
        -1, labels.unsqueeze(-1)).squeeze(-1)  # the anchor: a slightly different "old" policy
    rewards = torch.randint(0, 2, (num_seqs,), device=device).float()
    kwargs = dict(group_size=args.k, mask=mask, ref_logprobs=old_logprobs, beta=args.beta)

    loss, stats = gk.gvpo_loss(logits, labels, rewards, backend=args.backend, return_stats=True, **kwargs)
    loss.backward()
    reference = gk.reference.gvpo_loss(logits.detach(), labels, rewards, **kwargs)

    print(f"device {device}, backend {args.backend}: {args.prompts} groups of {args.k}, "
          f"T={args.seq_len}, V={args.vocab}, beta={args.beta}")
    print(f"{'group':>5} {'seq':>4} {'reward':>7} {'tokens':>6} {'log p(y)':>10} {'r_i':>9} {'dL/ds_i':>10}")
    for i in range(num_seqs):
        print(f"{i // args.k:>5} {i:>4} {rewards[i].item():>7.1f} {int(mask[i].sum()):>6} "
              f"{stats.seq_logprob[i].item():>10.3f} {stats.implicit_reward[i].item():>9.4f} "
              f"{stats.grad_seq_logprob[i].item():>10.5f}")
    print(f"loss {loss.item():.6f} (reference {reference.item():.6f}), "
          f"|dL/dlogits| = {logits.grad.norm().item():.6f}")


if __name__ == "__main__":
    main()
