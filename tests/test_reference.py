"""The oracle itself: hand-computed values, gradcheck, and the properties the GVPO math must have."""

import math

import pytest
import torch

import gvpo_kernels as gk

ref = gk.reference.gvpo_loss


def test_hand_computed_example():
    """One group of two one-token sequences, V = 2, worked out with the math module."""
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0], [0]])
    anchor = torch.tensor([[math.log(0.25)], [math.log(0.5)]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    beta = 0.5

    s = [math.log(0.5), math.log(0.75)]
    r = [beta * (s[0] - math.log(0.25)), beta * (s[1] - math.log(0.5))]
    d = [(r[i] - sum(r) / 2) - (rewards[i].item() - 0.5) for i in range(2)]
    want = (d[0] ** 2 + d[1] ** 2) / (2 * 1)

    loss, stats = ref(logits, labels, rewards, group_size=2, ref_logprobs=anchor, beta=beta, return_stats=True)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert stats.seq_logprob.tolist() == pytest.approx(s, rel=1e-6)
    assert stats.grad_seq_logprob.tolist() == pytest.approx([beta * d[0], beta * d[1]], rel=1e-6)

    loss.backward()
    p = [[0.5, 0.5], [0.75, 0.25]]  # dL/dlogits = dL/ds * (onehot - p)
    want_grad = [[beta * d[i] * (1 - p[i][0]), -beta * d[i] * p[i][1]] for i in range(2)]
    assert logits.grad.squeeze(1).tolist()[0] == pytest.approx(want_grad[0], rel=1e-9)
    assert logits.grad.squeeze(1).tolist()[1] == pytest.approx(want_grad[1], rel=1e-9)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (4, 3), generator=gen)
    kwargs = dict(group_size=2, ref_logprobs=-torch.rand(4, 3, dtype=torch.float64, generator=gen),
                  mask=torch.rand(4, 3, generator=gen) < 0.7, temperature=0.7, beta=0.5)
    rewards = torch.randn(4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x: ref(x, labels, rewards, **kwargs), (logits,))


def test_on_policy_value_is_constant_and_gradient_follows_centred_rewards():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 7, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 7, (6, 4), generator=gen)
    rewards = torch.randn(6, dtype=torch.float64, generator=gen)
    beta, k = 0.3, 3
    loss, stats = ref(logits, labels, rewards, group_size=k, beta=beta, reduction="sum", return_stats=True)
    centred = rewards.view(2, k) - rewards.view(2, k).mean(1, keepdim=True)
    assert loss.item() == pytest.approx((centred**2).sum().item() / (2 * (k - 1)))
    expected = (-beta / (k - 1) * centred).flatten().float()
    torch.testing.assert_close(stats.grad_seq_logprob, expected)
    assert stats.implicit_reward.abs().max() == 0


def test_groups_of_one_contribute_nothing():
    logits = torch.randn(3, 4, 6, requires_grad=True)
    labels = torch.randint(0, 6, (3, 4))
    loss = ref(logits, labels, torch.randn(3), group_size=1, ref_logprobs=-torch.rand(3, 4))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_padded_and_packed_agree_and_reduction_mean_is_sum_over_groups():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, 9, generator=gen)
    labels = torch.randint(0, 9, (4, 5), generator=gen)
    anchor = -torch.rand(4, 5, generator=gen)
    rewards = torch.randn(4, generator=gen)
    padded = ref(logits, labels, rewards, group_size=2, ref_logprobs=anchor, reduction="sum")
    packed = ref(logits.flatten(0, 1), labels.flatten(), rewards, group_size=2, ref_logprobs=anchor.flatten(),
                 cu_seqlens=torch.arange(0, 21, 5), reduction="sum")
    mean = ref(logits, labels, rewards, group_size=2, ref_logprobs=anchor)
    torch.testing.assert_close(padded, packed)
    torch.testing.assert_close(mean, padded / 2)


def test_group_ids_are_labels_not_positions():
    """Permuting the sequences together with their group ids and rewards leaves the loss unchanged."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 3, 8, generator=gen)
    labels = torch.randint(0, 8, (5, 3), generator=gen)
    rewards = torch.randn(5, generator=gen)
    ids = torch.tensor([9, 2, 9, 2, 2])
    perm = torch.tensor([3, 0, 4, 2, 1])
    a = ref(logits, labels, rewards, group_ids=ids, ref_logprobs=-torch.ones(5, 3))
    b = ref(logits[perm], labels[perm], rewards[perm], group_ids=ids[perm], ref_logprobs=-torch.ones(5, 3))
    torch.testing.assert_close(a, b)


def test_temperature_divides_the_logits():
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    rewards = torch.tensor([1.0, 0.0])
    anchor = -torch.ones(2, 3)
    hot = ref(logits, labels, rewards, group_size=2, ref_logprobs=anchor, temperature=0.5)
    scaled = ref(logits * 2, labels, rewards, group_size=2, ref_logprobs=anchor)
    torch.testing.assert_close(hot, scaled)
