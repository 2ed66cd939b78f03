"""The Triton backend's linear work (gvpo_kernels.backend.LinearWork): one call's chunks of scored rows, the launches
of linear.py's kernels over a chunk, its buffers, and the float32 gradient accumulators that cuBLAS fills. The GEMM
schedule that drives it is gvpo_kernels/schedule.py."""

import torch
import triton

from .. import layout
from .._alloc import empty
from ..backend import Coefs, Grads, LogitSpec, TokenStats
from . import linear as kernels
from .plan import device_of, launch


def linear_work(rows, weight, bias, target, spec: LogitSpec, needs, entropy: bool) -> "_LinearWork":
    """rows (B', T', H) hidden, weight (V, H), bias (V,) or None: the chunk kernels of one linear call."""
    return _LinearWork(rows, weight, bias, target, spec, needs, entropy)


class _LinearWork:
    """One linear call: the scored rows, the launches over a chunk, its buffers, and the float32 gradient
    accumulators (allocated only for the gradients in ``needs``); backend.LinearWork.

    A kept chunk stores exp((y - tile max) s) in the input dtype and each tile's max (STORE_EXP) and turns them into
    dx in place (linear_grad_from_exp_kernel); a soft-capped call keeps nothing (dy/dx needs y) and recomputes."""

    def __init__(self, rows, weight, bias, target, spec: LogitSpec, needs, entropy: bool):
        self.rows, self.bias, self.spec, self.entropy = rows, bias, spec, entropy
        self.weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        self.target = target
        self.device = device_of(rows.device)
        # the forward's tiles (num_splits sizes the partials from them): heavy with entropy under a soft-cap
        self.config = kernels.tile_config(rows.dtype, weight.shape[1], self.device,
                                          heavy=kernels.heavy("forward", entropy, spec))
        self.store_config = kernels.tile_config(rows.dtype, weight.shape[1], self.device, store=True)
        self.scored = (target >= 0).nonzero().squeeze(1)
        self.flat_hidden = layout.flat_rows(rows)
        self._buffers, self._kept = {}, None
        f32 = dict(dtype=torch.float32, device=rows.device)
        self.d_hidden = torch.zeros(self.flat_hidden.shape, dtype=rows.dtype, device=rows.device) if needs[0] else None
        self.d_weight = torch.zeros(weight.shape, **f32) if needs[1] else None
        self.d_bias = torch.zeros(weight.shape[0], **f32) if needs[2] and bias is not None else None

    def chunk_rows(self, keep: bool) -> int:
        """Rows per chunk: a chunk buffer of at most linear.CHUNK_BYTES (at least BLOCK_N rows)."""
        vocab_size, block = self.weight.shape[0], self.config["BLOCK_N"]
        return max(block, kernels.CHUNK_BYTES // (vocab_size * self.rows.element_size()) // block * block)

    def _buffer(self, name, num_rows, cols, dtype):
        """A (num_rows, cols) view of one buffer per name, reused by every chunk (allocated for the first)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < num_rows * cols:
            buf = self._buffers[name] = empty((num_rows * cols,), dtype=dtype, device=self.rows.device)
        return buf[: num_rows * cols].view(num_rows, cols)

    def forward(self, tokens, keep: bool) -> TokenStats:
        """The statistics of the scored rows ``tokens`` (M,). The splits' partials merge at their common max M:
        L = sum e^((m_i - M) s) L_i, A = sum e^((m_i - M) s) (A_i + (m_i - M) s L_i), H = log L - A / L."""
        store = keep and self.spec.softcap is None
        config = self.store_config if store else self.config
        num = tokens.numel()
        exp = self._buffer("chunk", num, self.weight.shape[0], self.rows.dtype) if store else None
        tile_max = (self._buffer("tile_max", num, triton.cdiv(self.weight.shape[0], config["BLOCK_V"]), torch.float32)
                    if store else None)
        splits = kernels.num_splits(num, self.weight.shape[0], config, self.device)
        parts = empty((4 if self.entropy else 3, splits, num), dtype=torch.float32, device=self.rows.device)
        launch(kernels.forward_plan(self.rows, self.weight, self.bias, tokens, self.target, parts, self.spec, self.device,
                            exp, tile_max))
        self._kept = (exp, tile_max) if store else None
        split_max, split_sumexp, split_label = parts[:3]
        top = split_max.max(dim=0).values
        shift = torch.where(top == float("-inf"), 0.0, top)
        moved = (split_max - shift) * self.spec.s
        weights = torch.exp(moved)
        sum_exp = (split_sumexp * weights).sum(dim=0)
        log_sum = torch.log(sum_exp)
        logprob = (split_label.sum(dim=0) - shift) * self.spec.s - log_sum
        entropy = None
        if self.entropy:  # moved L_i is 0, never -inf * 0, for a split of -inf logits only
            ent_sum = (weights * (parts[3] + moved.clamp(min=torch.finfo(torch.float32).min) * split_sumexp)).sum(0)
            entropy = log_sum - ent_sum / sum_exp
        return TokenStats(logprob, torch.stack([shift, log_sum]), entropy)

    def backward(self, tokens, norm, coefs: Coefs, kept: bool) -> None:
        norm = norm.contiguous()
        coefs = Coefs(*(None if c is None else c.contiguous() for c in coefs))
        if kept and self._kept is not None:
            exp, tile_max = self._kept
            launch(kernels.grad_from_exp_plan(exp, tile_max, self.target[tokens], norm, coefs, self.spec,
                                      self.store_config["BLOCK_V"], self.device))
            grad = exp
        else:
            grad = self._buffer("chunk", tokens.numel(), self.weight.shape[0], self.rows.dtype)
            launch(kernels.backward_plan(self.rows, self.weight, self.bias, tokens, self.target, norm, coefs, grad,
                                         self.spec, self.device))
        self._kept = None
        self._add_grads(tokens, grad)

    def _add_grads(self, chunk, grad):
        """Contract the chunk's dL/dlogits grad (M_c, V) into the gradients asked for (cuBLAS)."""
        if self.d_hidden is not None:
            self.d_hidden.index_copy_(0, chunk, grad @ self.weight)
        if self.d_weight is not None:
            _add_matmul_(self.d_weight, grad.T, self.flat_hidden.index_select(0, chunk))
        if self.d_bias is not None:
            self.d_bias += grad.sum(dim=0, dtype=torch.float32)

    def grads(self) -> Grads:
        """d_hidden (B', T', H), d_weight (V, H), d_bias (V,) in their final dtypes, None where not computed."""
        return Grads(None if self.d_hidden is None else self.d_hidden.view(self.rows.shape),
                     None if self.d_weight is None else self.d_weight.to(self.weight.dtype),
                     None if self.d_bias is None else self.d_bias.to(self.weight.dtype))


_MIXED_ADDMM = [True]  # False once this PyTorch has shown it lacks addmm(out_dtype=)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, accumulated in float32 inside the GEMM where the inputs allow it."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if _MIXED_ADDMM[0]:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # bf16 operands, fp32 C read and written
                return
            except (TypeError, RuntimeError):
                _MIXED_ADDMM[0] = False
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)  # an older PyTorch: one float32 temporary per chunk
            return
        except TypeError:  # older still (torch < 2.8 has no out_dtype): float32 copies of the operands
            pass
    acc.addmm_(a.float(), b.float())
