"""The verl plug-in across data-parallel ranks: helpers shared with tests/test_verl.py, and what each process of
its multi-process tests runs (gloo on the CPU, started by a forkserver that has imported verl once).

Every rank builds the same full problem from one seed and lays the rows out over the ranks as verl's dispatch does
(rank r holds a contiguous chunk, in order). Legacy trainer (:func:`check_legacy`): each rank splits its rows into
micro-batches of ``MICRO`` (micro-batch step m is the m-th micro-batch of every rank), runs each through verl's own
``ppo_loss`` (hooked by the plug-in) with ``dp_group`` the world, and averages the gradients over the ranks as
FSDP does. v1 trainer (:func:`check_v1`): a batch in finishing order goes through the plug-in's ``_balance_batch``
and ``_update_actor``, then verl's own mini-batch iterator and ``prepare_micro_batches`` (fixed and dynamic), as
verl's actor worker runs them. Results are compared with ``gvpo_kernels.reference.gvpo_loss`` (float64,
``reduction="mean"``) on the whole batch or mini-batch.
"""

import datetime
import os
import random
import sys
import types
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


def rank_tensordict(uids, labels, mask, advantages, anchor, rows, dp_size, prompt_len=3, extra=None):
    """verl's actor input for the ``rows`` of one rank: DataProto with uids -> TensorDict (no padding), with the
    global row ids in a "row" field, ``dp_size`` and the whole batch as the global batch. Prompts are left-padded
    with 1..prompt_len tokens (the same for a row whatever rank holds it); ``extra`` adds non-tensor keys."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    prompt_lens, prompts = prompt_shapes(len(uids), prompt_len)
    prompt_lens, prompts = prompt_lens[rows], prompts[rows]
    response_mask = mask[rows]
    prompt_mask = torch.arange(prompt_len)[None, :] >= (prompt_len - prompt_lens)[:, None]  # left padding
    attention = torch.cat([prompt_mask, response_mask], dim=1).long()
    data = DataProto.from_dict(
        tensors=dict(input_ids=torch.cat([prompts, labels[rows]], 1), attention_mask=attention,
                     position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompts=prompts, responses=labels[rows],
                     response_mask=response_mask.long(), old_log_probs=anchor[rows], advantages=advantages[rows],
                     row=rows),
        non_tensors=dict(uid=np.array([uids[i] for i in rows.tolist()], dtype=object)))
    batch = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(batch, **{"dp_size": dp_size, "batch_num_tokens": int(mask.sum()),
                                   "global_batch_size": len(uids), **(extra or {})})
    return batch


def prompt_shapes(num, prompt_len=3):
    """Per-row prompt lengths (1..prompt_len) and tokens, from a fixed seed: every rank builds the same."""
    gen = torch.Generator().manual_seed(11)
    return torch.randint(1, prompt_len + 1, (num,), generator=gen), torch.randint(0, VOCAB, (num, prompt_len),
                                                                                   generator=gen)


def model_output(per_token, mask, rows, prompt_len=3):
    """verl's model output for ``rows`` in no-padding layout: one entry per real token, where the entry before each
    response token holds that token's log-prob (``verl.workers.utils.padding.no_padding_2_padding`` reads it)."""
    prompt_lens, _ = prompt_shapes(len(per_token), prompt_len)
    pieces = []
    for row in torch.as_tensor(rows).tolist():
        pieces += [per_token.new_zeros(int(prompt_lens[row]) - 1), per_token[row, mask[row]], per_token.new_zeros(1)]
    return {"log_probs": torch.cat(pieces)}


def micro_batch_losses(uids, logits, labels, mask, advantages, anchor, rows, micro, config, dp_size, dp_group):
    """verl's actor path for the ``rows`` of one rank: TensorDict (:func:`rank_tensordict`) -> micro-batches of
    ``micro`` rows -> verl's ``ppo_loss`` (hooked) -> gvpo. Returns the sum of the micro-batch losses (a graph to
    ``logits``) and the last micro-batch's metrics. The global batch is all of ``uids``: one mini-batch."""
    batch = rank_tensordict(uids, labels, mask, advantages, anchor, rows, dp_size)
    per_token = token_logprobs(logits, labels)
    loss_fn = partial(verl_losses.ppo_loss, config=config)  # what verl's actor builds in init_model
    total, metrics = 0.0, {}
    for micro_batch in tu.chunk_tensordict(batch, len(rows) // micro):
        loss, metrics = loss_fn(model_output=model_output(per_token, mask, micro_batch["row"]), data=micro_batch,
                                dp_group=dp_group)
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
    """The legacy trainer's layouts (:func:`check_legacy`) and the v1 trainer's step (:func:`check_v1`), in one
    process group."""
    from verl.utils import seqlen_balancing

    torch.set_num_threads(1)
    # verl's platform is CUDA by default (verl/plugin/platform), and its dynamic micro-batching exchanges counts on
    # get_device_name(): these ranks are CPU processes with gloo
    seqlen_balancing.get_device_name = lambda: "cpu"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    check_legacy(rank, world, dist.group.WORLD)
    check_v1(rank, world, dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tests/distributed_worker.py: skip the interpreter's teardown, where gloo sometimes aborts


def check_legacy(rank: int, world: int, everyone) -> None:
    """Groups split over ranks (uneven shares), and the legacy trainer's group-keeping balancing, against one
    process holding all (the loss centres a group across ranks)."""
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


# ---- verl's v1 trainer ---------------------------------------------------------------------------------------------

PAD_UID = "pad" + "0123456789abcdef" * 2  # verl's padding rows share one uid of this form
PROMPT_LEN, RESPONSE_LEN = 3, 5
V1_MICRO = 2 * K  # ppo_micro_batch_size_per_gpu of the v1 runs (fixed): two groups
MAX_TOKENS = 24  # ppo_max_token_len_per_gpu of the dynamic runs: K x the longest row (3 + 5 tokens), a group or two


class WorkerGroup:
    """The part of verl's RayWorkerGroup that ``_balance_batch`` reads: the dp rank of each worker."""

    def __init__(self, world):
        self.world, self._dispatch_info = world, {}

    def _query_dispatch_info(self, role):
        return list(range(self.world))


class Trainer:
    """The parts of verl's v1 ``PPOTrainer`` that ``init``, ``_balance_batch`` and ``_update_actor`` use; their
    code is verl's own (taken from the class), or the plug-in's where it patched them."""

    use_critic = False
    global_steps = 1
    distillation_config = None

    def __init__(self, config, world):
        from verl.trainer.ppo.v1.trainer_base import PPOTrainer

        self.config, self.actor_rollout_wg = config, WorkerGroup(world)
        self.tokenizer = types.SimpleNamespace(eos_token_id=0)
        self.setup_calls, self.updates = 0, []
        for name in ("_get_required_batch_multiple", "_update_actor"):  # verl's (the latter patched)
            setattr(self, name, types.MethodType(getattr(PPOTrainer, name), self))

    def _setup(self):
        self.setup_calls += 1

    def on_init_end(self):
        pass


def v1_config(world, *, dynamic=False, loss_mode="gvpo", **actor):
    from omegaconf import OmegaConf

    options = dict(policy_loss={"loss_mode": loss_mode, "ppo_kl_coef": BETA}, ppo_mini_batch_size=4 * world,
                   ppo_micro_batch_size_per_gpu=V1_MICRO, use_dynamic_bsz=dynamic, ppo_max_token_len_per_gpu=MAX_TOKENS,
                   shuffle=False, ulysses_sequence_parallel_size=1, calculate_entropy=False, entropy_coeff=0.0,
                   ppo_epochs=1, data_loader_seed=42)
    options.update(actor)
    return OmegaConf.create({
        "actor_rollout_ref": {"actor": options, "rollout": {"n": K, "temperature": TEMPERATURE}},
        "data": {"max_prompt_length": PROMPT_LEN, "max_response_length": RESPONSE_LEN},
        "trainer": {"critic_warmup": 0}})


def v1_batch(world, seed=0):
    """A v1 batch as the replay buffer hands it over: 8 world - 1 prompts x K rollouts in finishing order
    (interleaved), then K rows of verl's padding (no response tokens, reward 0), as ``_balance_batch`` pads a
    batch to a multiple of lcm(dp, ppo_mini_batch_size x n). Returns (KVBatchMeta, the uid of each row, problem)."""
    from transfer_queue import KVBatchMeta

    rng = random.Random(seed)
    real = [(f"prompt-{p:03d}", session) for p in range(8 * world - 1) for session in range(K)]
    rng.shuffle(real)
    rows = real + [(PAD_UID, i) for i in range(K)]
    uids = [uid for uid, _ in rows]
    problem = make_rollouts(uids, response_len=RESPONSE_LEN, seed=seed)
    logits, labels, mask, rewards, scores, anchor = problem
    pad = torch.tensor([uid == PAD_UID for uid in uids])
    mask[pad] = False
    rewards[pad] = 0.0
    scores[pad] = 0.0
    anchor = anchor.masked_fill(~mask, 0.0)
    prompt_lens, _ = prompt_shapes(len(uids), PROMPT_LEN)
    tags = [{"status": "success", "seq_len": int(prompt_lens[i] + mask[i].sum()), **({"is_padding": True} if
             pad[i] else {})} for i in range(len(uids))]
    batch = KVBatchMeta(keys=[f"{uid}_{session}_0" for uid, session in rows], tags=tags, partition_id="train")
    return batch, uids, (logits, labels, mask, rewards, scores, anchor)


def v1_update(rank, world, info, dynamic, uids, keys, problem, process_group):
    """What verl's actor does with one v1 update on this rank (``TrainingWorker.train_mini_batch`` and the engine's
    ``forward_backward_batch``): the dispatch's contiguous chunk of the batch (``keys``, in the trainer's order),
    ``info`` (the batch's extra_info, as ``_update_actor`` and the plug-in left it) as non-tensor data, verl's own
    mini-batch iterator (``tu.make_iterator``) and ``prepare_micro_batches`` (fixed, or dynamic with the
    ``force_group_size`` of ``info``: ``dynamic`` is the engine's ``use_dynamic_bsz``), each micro-batch through the
    hooked ``ppo_loss``.
    Returns, per mini-batch, (summed loss, the mini-batch's global rows over all ranks)."""
    from verl.workers.engine.utils import prepare_micro_batches

    logits, labels, mask, rewards, scores, anchor = problem
    advantages = verl_advantages(scores, mask, uids)
    config = make_actor_config(ppo_micro_batch_size_per_gpu=V1_MICRO, ppo_mini_batch_size=info["mini_batch_size"] // K,
                               use_dynamic_bsz=dynamic, ppo_max_token_len_per_gpu=MAX_TOKENS)
    index = {key: i for i, key in enumerate(v1_batch(world)[0].keys)}  # the problem's rows are in this key order
    order = [index[key] for key in keys]
    share = len(order) // world
    data = rank_tensordict(uids, labels, mask, advantages, anchor, order[rank * share:(rank + 1) * share], world,
                           PROMPT_LEN, extra=info)
    loss_fn = partial(verl_losses.ppo_loss, config=config)
    results = []
    for mini_batch in tu.make_iterator(data, mini_batch_size=info["mini_batch_size"] // world, epochs=info["epochs"],
                                       seed=info["seed"] + rank, dataloader_kwargs=info["dataloader_kwargs"]):
        # what the engine adds before prepare_micro_batches
        tu.assign_non_tensor(mini_batch, batch_num_tokens=int(mask.sum()), use_dynamic_bsz=dynamic,
                             micro_batch_size_per_gpu=V1_MICRO, max_token_len_per_gpu=MAX_TOKENS)
        micro_batches, _ = prepare_micro_batches(data=mini_batch, dp_group=process_group, same_micro_num_in_dp=True)
        per_token = token_logprobs(logits, labels)  # the model's forward, one per mini-batch
        total = 0.0
        for micro_batch in micro_batches:
            loss, _ = loss_fn(model_output=model_output(per_token, mask, micro_batch["row"], PROMPT_LEN),
                              data=micro_batch, dp_group=process_group)
            total = total + loss
        everyone = [None] * world
        dist.all_gather_object(everyone, mini_batch["row"].tolist(), group=process_group)
        results.append((total, [r for rows in everyone for r in rows]))
    return results


def run_v1_step(rank, world, trainer, balance, process_group):
    """The v1 step's balancing (``balance``: the plug-in's or verl's own) and actor update, through the trainer's
    (patched) ``_update_actor``; returns the mini-batches of :func:`v1_update`."""
    batch, uids, problem = v1_batch(world)
    metrics = {}
    balanced = balance(trainer, batch, metrics)
    assert balanced is batch and any(key.startswith("global_seqlen") for key in metrics)
    results = []

    def update_actor(batch):
        trainer.updates.append(dict(batch.extra_info))
        dynamic = trainer.config.actor_rollout_ref.actor.use_dynamic_bsz
        results.extend(v1_update(rank, world, dict(batch.extra_info), dynamic, uids, batch.keys, problem,
                                 process_group))
        return {"metrics": {"mfu": [0.0]}}

    trainer.actor_rollout_wg.update_actor = update_actor
    trainer._update_actor(batch, metrics)
    return results, uids, problem


def check_v1_update(rank, world, dynamic, process_group, scale=1.0) -> str:
    """The plug-in's v1 balancing and update against ``scale`` x the float64 reference (the mean of L_G over the
    mini-batch's groups) on each mini-batch; returns a report."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    trainer = Trainer(v1_config(world, dynamic=dynamic), world)
    results, uids, problem = run_v1_step(rank, world, trainer, PPOTrainer._balance_batch, process_group)
    assert trainer.updates[0][plugin.WHOLE_GROUPS_KEY] == K
    assert trainer.updates[0].get("force_group_size") == (K if dynamic else None)
    logits, labels, mask, rewards, scores, anchor = problem
    worst = 0.0
    assert len(results) == 2  # two mini-batches
    for total, rows in results:
        (grad,) = torch.autograd.grad(total, logits)
        dist.all_reduce(grad, group=process_group)  # FSDP: the mean of the ranks' gradients
        grad /= world
        value = total.detach().clone()
        dist.all_reduce(value, group=process_group)  # verl's loss metric: averaged over ranks
        value /= world
        rows = torch.tensor(sorted(rows))
        want, want_grad = reference_loss_and_grad(logits[rows], labels[rows], mask[rows], rewards[rows],
                                                  anchor[rows], [uids[r] for r in rows.tolist()])
        others = torch.ones(len(uids), dtype=torch.bool)
        others[rows] = False
        assert grad[others].eq(0).all()  # nothing from rows of other mini-batches
        errors = rel_err(value, scale * want), rel_err(grad[rows], scale * want_grad)
        assert max(errors) <= TOLERANCE, (world, dynamic, scale, errors)
        worst = max(worst, *errors)
    return f"v1 {'dynamic' if dynamic else 'fixed'}{' recipe scale' if scale != 1 else ''}: worst error {worst:.2e}"


def check_v1_verl_order_fails(rank, world, dynamic, process_group) -> str:
    """verl's own v1 balancing (rows by length, groups scattered) under the plug-in's update: the loss refuses."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    trainer = Trainer(v1_config(world, dynamic=dynamic), world)
    try:
        run_v1_step(rank, world, trainer, PPOTrainer._balance_batch.__wrapped__, process_group)  # verl's method
    except ValueError as exc:
        assert "cut across micro-batch steps" in str(exc), str(exc)
        return f"verl's own balancing ({'dynamic' if dynamic else 'fixed'}): refused"
    raise AssertionError("verl's own v1 balancing was accepted")


def check_v1(rank: int, world: int, everyone) -> None:
    """The plug-in's v1 balancing and update (fixed and dynamic micro-batches, and the recipe's scale) against one
    process; verl's own v1 balancing refused by the loss."""
    reports = [check(rank, world, dynamic, everyone) for check in (check_v1_update, check_v1_verl_order_fails)
               for dynamic in (False, True)]
    os.environ[plugin.LOSS_SCALE_ENV] = "recipe"
    try:
        reports.append(check_v1_update(rank, world, False, everyone, scale=V1_MICRO / K))
    finally:
        del os.environ[plugin.LOSS_SCALE_ENV]
    if rank == 0:
        print(f"world {world}: " + "; ".join(reports), flush=True)
