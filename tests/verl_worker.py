"""The verl plug-in across data-parallel ranks: helpers shared with tests/test_verl.py, and what each process of
its multi-process tests runs (gloo on the CPU, started by a forkserver that has imported verl once).

Every rank builds the same full problem from one seed, lays the rows out over the ranks as verl's dispatch does
(rank r holds its rows in order and splits them into micro-batches of ``MICRO``; micro-batch step m is the m-th
micro-batch of every rank), runs each of its micro-batches through verl's own ``ppo_loss`` (hooked by the plug-in)
with ``dp_group`` the world, and averages the gradients over the ranks as FSDP does. The result is compared with
``gvpo_kernels.reference.gvpo_loss`` on the whole batch (float64, ``reduction="mean"``).
"""

import datetime
import os
import random
import sys
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from verl import DataProto
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig, PolicyLossConfig
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import left_right_2_no_padding

from gvpo_kernels import reference
from gvpo_kernels.integrations import verl as plugin

BETA = 0.1
TEMPERATURE = 0.8
K = 3  # rollout.n
VOCAB = 11
MICRO = 3  # ppo_micro_batch_size_per_gpu of the multi-process runs
TOLERANCE = 1e-5  # float32 against the float64 oracle, relative


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    return (got - want).norm().item() / scale if scale > 0 else (got - want).norm().item()


def make_actor_config(**overrides):
    options = dict(strategy="fsdp", rollout_n=K, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=K,
                   use_kl_loss=False, policy_loss=PolicyLossConfig(loss_mode="gvpo", ppo_kl_coef=BETA))
    options.update(overrides)
    return FSDPActorConfig(**options)


def make_rollouts(uids, response_len=5, seed=0, dtype=torch.float32):
    """Logits (S, T, V) as a leaf, labels, a right-padded response mask (one response fully masked, as a truncated
    one can be), raw rewards (S,), verl's token-level scores (reward at the last response token) and an anchor."""
    g = torch.Generator().manual_seed(seed)
    num = len(uids)
    logits = (torch.randn(num, response_len, VOCAB, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (num, response_len), generator=g)
    lengths = torch.randint(1, response_len + 1, (num,), generator=g)
    lengths[1] = response_len
    mask = torch.arange(response_len)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 5, (num,), generator=g).to(dtype)
    scores = torch.zeros(num, response_len, dtype=dtype)
    scores[torch.arange(num), lengths - 1] = rewards
    anchor = (-torch.rand(num, response_len, generator=g) * 4).to(dtype).masked_fill(~mask, 0.0)
    return logits, labels, mask, rewards, scores, anchor


def token_logprobs(logits, labels):
    return torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def verl_advantages(scores, mask, uids, norm_by_std=False):
    grpo = get_adv_estimator_fn("grpo")
    advantages, _ = grpo(token_level_rewards=scores, response_mask=mask.float(), index=np.array(uids, dtype=object),
                         norm_adv_by_std_in_grpo=norm_by_std)
    return advantages


def reference_loss_and_grad(logits, labels, mask, rewards, anchor, uids):
    """The oracle: float64 reference GVPO on the whole batch, mean over groups; (loss, d loss / d logits)."""
    leaf = logits.detach().double().requires_grad_()
    want = reference.gvpo_loss(leaf, labels, rewards.double(), group_ids=plugin.uids_to_group_ids(uids), mask=mask,
                               ref_logprobs=anchor.double(), beta=BETA, temperature=TEMPERATURE, reduction="mean")
    return want, torch.autograd.grad(want, leaf)[0]


def micro_batch_losses(uids, logits, labels, mask, advantages, anchor, rows, micro, config, dp_size, dp_group,
                       prompt_len=3):
    """verl's actor path for the ``rows`` of one rank: DataProto with uids -> TensorDict (no padding) -> micro-batches
    of ``micro`` rows -> verl's ``ppo_loss`` (hooked) -> gvpo. Returns the sum of the micro-batch losses (a graph to
    ``logits``) and the last micro-batch's metrics. The global batch is all of ``uids``: one mini-batch."""
    rows = torch.as_tensor(rows)
    num = len(rows)
    gen = torch.Generator().manual_seed(11)
    prompt_lens = torch.randint(1, prompt_len + 1, (len(uids),), generator=gen)[rows]
    prompts = torch.randint(0, VOCAB, (len(uids), prompt_len), generator=gen)[rows]
    response_mask = mask[rows]
    prompt_mask = torch.arange(prompt_len)[None, :] >= (prompt_len - prompt_lens)[:, None]  # left padding
    attention = torch.cat([prompt_mask, response_mask], dim=1).long()
    data = DataProto.from_dict(
        tensors=dict(input_ids=torch.cat([prompts, labels[rows]], 1), attention_mask=attention,
                     position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompts=prompts, responses=labels[rows],
                     response_mask=response_mask.long(), old_log_probs=anchor[rows], advantages=advantages[rows]),
        non_tensors=dict(uid=np.array([uids[i] for i in rows.tolist()], dtype=object)))
    batch = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(batch, dp_size=dp_size, batch_num_tokens=int(mask.sum()), global_batch_size=len(uids))

    # verl's actor hands the loss the model's log-probs in no-padding layout: one row per real token, where the row
    # before each response token holds that token's log-prob.
    per_token = token_logprobs(logits, labels)

    def model_output_for(local_rows):
        pieces = []
        for i in local_rows:
            row = int(rows[i])
            pieces += [per_token.new_zeros(int(prompt_lens[i]) - 1), per_token[row, mask[row]],
                       per_token.new_zeros(1)]
        return {"log_probs": torch.cat(pieces)}

    loss_fn = partial(verl_losses.ppo_loss, config=config)  # what verl's actor builds in init_model
    total, metrics = 0.0, {}
    for index, micro_batch in enumerate(tu.chunk_tensordict(batch, num // micro)):
        loss, metrics = loss_fn(model_output=model_output_for(range(index * micro, (index + 1) * micro)),
                                data=micro_batch, dp_group=dp_group)
        total = total + loss
    return total, metrics


def scattered_order(uids, dp_size, micro, seed):
    """A layout verl could produce and the old plug-in got wrong: each micro-batch step holds whole groups, their
    rows dealt at random over the ranks (groups split over ranks, in uneven shares)."""
    rng = random.Random(seed)
    step_rows = dp_size * micro
    ranks = [[] for _ in range(dp_size)]
    for start in range(0, len(uids), step_rows):
        rows = list(range(start, start + step_rows))
        rng.shuffle(rows)
        for rank in range(dp_size):
            ranks[rank].extend(rows[rank * micro:(rank + 1) * micro])
    return ranks


def check_step(rank, world, uids, order, process_group, scale=1.0):
    """Run this rank's share; return (loss error, gradient error) against ``scale`` x the oracle."""
    logits, labels, mask, rewards, scores, anchor = make_rollouts(uids, seed=world)
    advantages = verl_advantages(scores, mask, uids)
    config = make_actor_config(ppo_micro_batch_size_per_gpu=MICRO)
    total, metrics = micro_batch_losses(uids, logits, labels, mask, advantages, anchor, order[rank], MICRO, config,
                                        world, process_group)
    (grad,) = torch.autograd.grad(total, logits)
    dist.all_reduce(grad)  # FSDP: the mean of the ranks' gradients
    grad /= world
    value = total.detach().clone()
    dist.all_reduce(value)  # verl's loss metric: summed over micro-batches, averaged over ranks
    value /= world
    want, want_grad = reference_loss_and_grad(logits, labels, mask, rewards, anchor, uids)
    assert "actor/pg_loss" in metrics
    return rel_err(value, scale * want), rel_err(grad, scale * want_grad)


def run_across_ranks(rank: int, world: int, init_file: str) -> None:
    """Groups split over ranks (uneven shares), and the plug-in's balancing, against one process holding all."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    everyone = dist.group.WORLD
    num_prompts = 2 * world * MICRO // K  # two micro-batch steps
    uids = [f"prompt-{p}" for p in range(num_prompts) for _ in range(K)]  # verl's order: a prompt's rows together
    _, _, mask, *_ = make_rollouts(uids, seed=world)
    workloads = (mask.sum(-1) + torch.arange(len(uids)) % 4).tolist()
    layouts = {"scattered": scattered_order(uids, world, MICRO, seed=1),
               "balanced": plugin.group_balanced_order(uids, workloads, world, MICRO)}
    for name, order in layouts.items():
        loss_err, grad_err = check_step(rank, world, uids, order, everyone)
        before_loss, before_grad = check_step(rank, world, uids, order, None)  # centred on each rank alone
        if rank == 0:
            print(f"world {world} {name}: across ranks loss err {loss_err:.2e} grad err {grad_err:.2e}; "
                  f"each rank alone loss err {before_loss:.3g} grad err {before_grad:.3g}", flush=True)
        assert loss_err <= TOLERANCE and grad_err <= TOLERANCE, (name, loss_err, grad_err)
        assert before_grad > 0.1, (name, before_grad)  # the layout does split groups: centring per rank is wrong
    os.environ[plugin.LOSS_SCALE_ENV] = "recipe"
    try:
        loss_err, grad_err = check_step(rank, world, uids, layouts["balanced"], everyone, scale=MICRO / K)
    finally:
        del os.environ[plugin.LOSS_SCALE_ENV]
    assert loss_err <= TOLERANCE and grad_err <= TOLERANCE, ("recipe scale", loss_err, grad_err)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tests/distributed_worker.py: skip the interpreter's teardown, where gloo sometimes aborts
