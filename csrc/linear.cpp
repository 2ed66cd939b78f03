// GVPO's linear path on the CPU, logits = hidden @ weight.T + bias never held whole, as torch.library ops in `gvpo`.
//
// For a chunk of r scored tokens (hidden (r, H), gathered by gvpo_kernels/cpu.py, which also picks the schedule):
//
//   linear_lse   token_logprob (r,) and norm (2, r) (gvpo_math.h: each row's shift and log_sum) of each token's
//                transformed logits y, and where an entropy tensor is given, entropy (r,), from the same pass
//   linear_grad  dL/dlogits = (coef (onehot(target) - p) + coef_entropy p (-log p - entropy)) dy/dx (the
//                entropy's term where entropy and coef_entropy are given), p from norm, contracted at once into
//                d_hidden (r, H), d_weight (V, H) and d_bias (V,) (float32, accumulated over chunks or not)
//
// Each thread owns a contiguous range of vocabulary rows (at::parallel_for over V: one parallel region per op,
// whatever the sizes: on a machine shared with other work, every parallel region waits for a core) and walks it
// in blocks of block_rows rows. A block's logits are computed *transposed*,
// z = weight[v0:v1] @ hidden.T (+ bias), (rows, r), by a one-thread GEMM into the thread's own buffer (block_rows
// x r, sized by the caller to stay in L2), and consumed at once while in cache:
//   - linear_lse folds them into the thread's running maximum and sum of exponentials per token, tile by tile
//     (kTileRows rows in L1: their maximum first, the running sum rescaled once where it grew, then one exp per
//     logit), and picks the target's logit where it lies in the block; the threads' partials are merged after.
//     Soft-capped logits (Spec.cap > 0) are capped in the block, in place, right after its GEMM.
//     With entropy, the entropy's running sum A (gvpo_math.h) is rescaled and summed alongside.
//   - linear_grad turns them into dL/dlogits (in place when float32), then d_weight[v0:v1] (+)= g @ hidden and
//     d_bias[v0:v1] (+)= row sums (rows the thread owns), and its own float32 d_hidden accumulator += g.T @ weight
//     [v0:v1]; the accumulators are summed into d_hidden after, in thread order.
// Every reduction has a fixed order (a thread's vocabulary range depends on its number and the thread count only,
// partials are merged in thread order): results are bitwise the same run to run at a given thread count (they may
// differ in the last bits between thread counts).
// The logits are float32 (float64 for float64 inputs) whatever the input dtype: a bfloat16 / float16 block of
// weight rows is converted to float32 once (a per-thread buffer) and serves the block's GEMMs, hidden once per
// chunk; the GEMMs are then float32 ones, as in torch's and the Triton backends (and faster than bfloat16 GEMMs on
// CPUs without bfloat16 instructions). -inf logits (a bias masking part of the vocabulary): see gvpo_math.h.
// Where the caller keeps the chunk's logits (logits_t, (V, r): the three-GEMM schedules, whose coefficients are
// known once the log-sum-exps are), linear_lse writes them there and linear_grad reads them instead of computing
// them again.
//
// Shapes and dtypes: hidden (r, H) contiguous, weight (V, H) with a contiguous last dimension, bias (V,); all one
// dtype: float32, bfloat16, float16 or float64 (GEMMs in float64 for float64, else float32; the rest float32).
// target (r,) int64 >= 0 (>= V: the label lies in another rank's slice of the vocabulary, its logit counts as 0
// and it gets no one-hot); token_logprob, coef, entropy, coef_entropy (r,) and norm (2, r) float32; logits_t
// (V, r) contiguous, float32 (float64 for float64 inputs), holding y once the forward has run; d_hidden (r, H),
// d_weight (V, H), d_bias (V,) contiguous float32. coef[t] = 0 gives token t no gradient (coef and coef_entropy).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <optional>
#include <vector>

#include "gvpo_math.h"

namespace gvpo {
namespace {

constexpr int64_t kTileRows = 32;  // vocabulary rows per tile of linear_lse: kTileRows x r floats in L1

// The dtype of the logits: float32, or float64 for float64 inputs (bfloat16 and float16 inputs are converted to
// float32 before their GEMMs, so that no logit is ever rounded to 8 or 11 bits, nor overflows float16's 65504).
template <typename scalar_t>
using logit_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The running log-sum-exp of tokens [0, width) over `rows` rows of a transposed block y (row stride ld): the
// running maximum m of y and acc = sum exp((y - m) s), with one exp per logit; with kEntropy, the entropy's sum
// `weighted` as well (relative to m). A token whose logits so far are all -inf keeps m = -inf and acc = weighted = 0.
template <bool kEntropy, typename x_t>
void fold_lse(const x_t* x, int64_t ld, int64_t rows, int64_t width, float s, float* m, float* acc,
              float* weighted, float* tile_max) {
  for (int64_t v0 = 0; v0 < rows; v0 += kTileRows) {
    const int64_t v1 = std::min(v0 + kTileRows, rows);
    std::fill(tile_max, tile_max + width, -std::numeric_limits<float>::infinity());
    for (int64_t v = v0; v < v1; ++v) {
      const x_t* row = x + v * ld;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const float y = static_cast<float>(row[j]);
        tile_max[j] = y > tile_max[j] ? y : tile_max[j];
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const float grown = tile_max[j] > m[j] ? tile_max[j] : m[j];
      const float moved = (m[j] - grown) * s;  // <= 0; -inf where m was -inf; NaN where both are -inf (unused)
      const float rescale = grown == m[j] ? 1.0f : exp_f32(moved);  // (equal also when both are -inf)
      if constexpr (kEntropy) {  // A <- e^moved (A + moved L); nothing to rescale while L = 0
        weighted[j] = grown == m[j] || acc[j] == 0.0f ? weighted[j] : rescale * (weighted[j] + moved * acc[j]);
      }
      acc[j] *= rescale;
      m[j] = grown;
      tile_max[j] = lse_shift(grown);  // from here on: the shift of the tile's exponentials
    }
    for (int64_t v = v0; v < v1; ++v) {
      const x_t* row = x + v * ld;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const float d = (static_cast<float>(row[j]) - tile_max[j]) * s;
        const float e = exp_f32(d);
        acc[j] += e;
        if constexpr (kEntropy) weighted[j] += entropy_term(e, d);
      }
    }
  }
}

// Per-token inputs of a gradient: shift, log_sum, coef and, with entropy, entropy and coef_entropy (else null),
// (r,) each.
struct TokenCoefs {
  const float *shift, *log_sum, *coef, *entropy, *coef_entropy;
};

// One row of a transposed block of y, as its part of every token's gradient: out[j] = softmax_grad (gvpo_math.h)
// with the token's coefficients (kEntropy: the entropy's too), times dy/dx (kCap), 0 where the coefficients are
// all 0 (never -c times garbage); out may be x.
template <bool kEntropy, bool kCap, typename x_t>
void row_softmax_grad_columns(const x_t* x, float* out, int64_t width, const Spec& spec, const TokenCoefs& t) {
  const Spec local = spec;  // by value: a store through out must not make the loop reload spec (floats may alias)
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const float y = static_cast<float>(x[j]);
    const float lp = log_prob(y, t.shift[j], local.s, t.log_sum[j]);
    const float c_ent = kEntropy ? t.coef_entropy[j] : 0.0f;
    float g = softmax_grad<kEntropy>(exp_f32(lp), lp, t.coef[j], c_ent, kEntropy ? t.entropy[j] : 0.0f);
    if constexpr (kCap) g *= soft_cap_grad(y, local);
    out[j] = t.coef[j] == 0.0f && c_ent == 0.0f ? 0.0f : g;
  }
}

// y of a block of raw logits, in place (capped specs only).
template <typename x_t>
void cap_block(at::Tensor& z, const Spec& spec) {
  if (!spec.capped()) return;
  x_t* x = z.data_ptr<x_t>();
  const int64_t len = z.numel();
  if constexpr (std::is_same_v<x_t, float>) {
    soft_cap(x, len, spec);
  } else {
    for (int64_t j = 0; j < len; ++j) x[j] = spec.cap * tanh_f32(static_cast<float>(x[j]) * spec.cap_scale);
  }
}

struct Chunk {
  at::Tensor hidden;  // (r, H) in the logits' dtype
  at::Tensor weight;  // (V, H) in the input dtype
  std::optional<at::Tensor> bias;  // (V,) in the logits' dtype
  const int64_t* target;
  Spec spec;
  int64_t block_rows;
};

// Per-thread buffers of one op: a block's logits (block_rows, r) and, for bfloat16 / float16 weights, the block's
// weight rows converted to float32 (block_rows, H), converted once and used by every GEMM of the block.
struct BlockBuffers {
  at::Tensor logits, weight32;

  BlockBuffers(const Chunk& c, bool need_logits) {
    const auto logit_dtype = c.hidden.scalar_type();
    if (need_logits) logits = at::empty({c.block_rows, c.hidden.size(0)}, c.hidden.options().dtype(logit_dtype));
    if (c.weight.scalar_type() == at::kBFloat16 || c.weight.scalar_type() == at::kHalf) {
      weight32 = at::empty({c.block_rows, c.weight.size(1)}, c.hidden.options().dtype(at::kFloat));
    }
  }

  // weight[v0:v0 + rows] as float32: the rows themselves, converted into weight32, or (float64) a converted copy.
  at::Tensor weight_rows_f32(const Chunk& c, int64_t v0, int64_t rows) const {
    const at::Tensor w = c.weight.narrow(0, v0, rows);
    if (c.weight.scalar_type() == at::kFloat) return w;
    if (!weight32.defined()) return w.to(at::kFloat);
    at::Tensor out = weight32.narrow(0, 0, rows);
    out.copy_(w);
    return out;
  }
};

// z = w @ hidden.T (+ bias[v0:v0 + rows]) into z (rows, r), w being weight[v0:v0 + rows] in the logits' dtype.
void block_logits(const Chunk& c, const at::Tensor& w, int64_t v0, at::Tensor& z) {
  if (c.bias.has_value()) {
    at::addmm_out(z, c.bias->narrow(0, v0, w.size(0)).unsqueeze(1), w, c.hidden.t());
  } else {
    at::mm_out(z, w, c.hidden.t());
  }
}

// weight[v0:v0 + rows] as the operand of the logits' GEMM (float64 inputs: the rows themselves).
template <typename scalar_t>
at::Tensor logits_operand(const Chunk& c, const BlockBuffers& buffers, int64_t v0, int64_t rows) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return c.weight.narrow(0, v0, rows);
  } else {
    return buffers.weight_rows_f32(c, v0, rows);
  }
}

// kEntropy: entropy_out (r,) gets each token's entropy (else it is null).
template <typename scalar_t, bool kEntropy>
void linear_lse_kernel(const Chunk& c, const at::Tensor& token_logprob, const at::Tensor& norm,
                       const std::optional<at::Tensor>& logits_t, float* entropy_out) {
  using x_t = logit_t<scalar_t>;
  const int64_t r = c.hidden.size(0), vocab = c.weight.size(0);
  const int64_t threads = at::get_num_threads();
  const float s = c.spec.s;
  // Per thread: running maximum of y, running sum, the target's y, entropy's sum (r each); a thread that gets no
  // rows leaves them as is. A thread's vocabulary range is fixed by its number and the thread count, and the
  // partials are merged in thread order: the same result run to run.
  constexpr int64_t kParts = 4;
  std::vector<float> partial(threads * kParts * r, 0.0f);
  for (int64_t t = 0; t < threads; ++t) {
    std::fill_n(partial.data() + t * kParts * r, r, -std::numeric_limits<float>::infinity());
  }
  at::parallel_for(0, vocab, c.block_rows, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // thread-local: the workers' ATen calls skip autograd too
    float* m = partial.data() + at::get_thread_num() * kParts * r;
    float* acc = m + r;
    float* label = acc + r;
    float* weighted = label + r;
    std::vector<float> tile_max(r);
    const BlockBuffers buffers(c, !logits_t.has_value());
    for (int64_t v0 = begin; v0 < end; v0 += c.block_rows) {
      const int64_t rows = std::min(c.block_rows, end - v0);
      at::Tensor z = logits_t.has_value() ? logits_t->narrow(0, v0, rows) : buffers.logits.narrow(0, 0, rows);
      block_logits(c, logits_operand<scalar_t>(c, buffers, v0, rows), v0, z);
      cap_block<x_t>(z, c.spec);
      const x_t* x = z.data_ptr<x_t>();
      fold_lse<kEntropy>(x, r, rows, r, s, m, acc, weighted, tile_max.data());
      for (int64_t j = 0; j < r; ++j) {
        const int64_t v = c.target[j] - v0;
        if (v >= 0 && v < rows) label[j] = static_cast<float>(x[v * r + j]);
      }
    }
  });
  float* logprob_out = token_logprob.data_ptr<float>();
  float* shift_out = norm.data_ptr<float>();
  float* log_sum_out = shift_out + r;
  for (int64_t j = 0; j < r; ++j) {  // merge the threads' partials
    float m = -std::numeric_limits<float>::infinity(), label = 0.0f;
    for (int64_t t = 0; t < threads; ++t) m = std::max(m, partial[t * kParts * r + j]);
    const float shift = lse_shift(m);
    float sum = 0.0f, weighted = 0.0f;
    for (int64_t t = 0; t < threads; ++t) {
      const float* p = partial.data() + t * kParts * r;
      if (p[r + j] != 0.0f) {  // (0: no rows, or all -inf; NaN stays)
        const float moved = (p[j] - shift) * s;
        const float rescale = exp_f32(moved);
        sum += p[r + j] * rescale;
        if constexpr (kEntropy) weighted += rescale * (p[3 * r + j] + moved * p[r + j]);
      }
      label += p[2 * r + j];  // the target's y from the thread that holds it, 0 from the others
    }
    shift_out[j] = shift;
    log_sum_out[j] = std::log(sum);
    logprob_out[j] = log_prob(label, shift, s, log_sum_out[j]);
    if constexpr (kEntropy) entropy_out[j] = entropy_of(sum, weighted);
  }
}

// out = parts[0] + parts[1] + ... in this order, element by element (the same sum whichever thread ends first);
// zeros when there is no part. Each part and out hold `size` floats.
void sum_in_order(const std::vector<at::Tensor>& parts, float* out, int64_t size) {
  std::vector<const float*> written;
  for (const at::Tensor& part : parts) {
    if (part.defined()) written.push_back(part.data_ptr<float>());
  }
  if (written.empty()) {
    std::fill(out, out + size, 0.0f);
    return;
  }
  at::parallel_for(0, size, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    std::copy(written[0] + begin, written[0] + end, out + begin);
    for (size_t t = 1; t < written.size(); ++t) {
      const float* part = written[t];
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) out[i] += part[i];
    }
  });
}

// kEntropy: tokens.entropy and tokens.coef_entropy add the entropy's term (else they are null); kCap: capped.
template <typename scalar_t, bool kEntropy, bool kCap>
void linear_grad_kernel(const Chunk& c, const TokenCoefs& tokens, const std::optional<at::Tensor>& logits_t,
                        const at::Tensor& d_hidden, const std::optional<at::Tensor>& d_weight,
                        const std::optional<at::Tensor>& d_bias, bool accumulate) {
  using x_t = logit_t<scalar_t>;
  const int64_t r = c.hidden.size(0), vocab = c.weight.size(0), hidden_size = c.hidden.size(1);
  constexpr bool kFloatLogits = std::is_same_v<x_t, float>;  // then the gradient overwrites the block's logits
  const at::Tensor hidden32 = c.hidden.to(at::kFloat);  // the float32 gradient meets float32 operands
  // Each thread's float32 d_hidden over its vocabulary range, summed in thread order after (deterministic).
  std::vector<at::Tensor> d_hidden_parts(at::get_num_threads());
  at::parallel_for(0, vocab, c.block_rows, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // thread-local: the workers' ATen calls skip autograd too
    at::Tensor d_hidden_part = at::empty({r, hidden_size}, hidden32.options());
    bool part_written = false;
    const BlockBuffers buffers(c, !logits_t.has_value());
    at::Tensor grad_buffer = kFloatLogits ? at::Tensor() : at::empty({c.block_rows, r}, hidden32.options());
    std::vector<float> target_grads(r);
    for (int64_t v0 = begin; v0 < end; v0 += c.block_rows) {
      const int64_t rows = std::min(c.block_rows, end - v0);
      const at::Tensor w32 = buffers.weight_rows_f32(c, v0, rows);
      at::Tensor z = logits_t.has_value() ? logits_t->narrow(0, v0, rows) : buffers.logits.narrow(0, 0, rows);
      if (!logits_t.has_value()) {
        block_logits(c, kFloatLogits ? w32 : c.weight.narrow(0, v0, rows), v0, z);
        cap_block<x_t>(z, c.spec);
      }
      at::Tensor g = kFloatLogits ? z : grad_buffer.narrow(0, 0, rows);
      const x_t* x = z.data_ptr<x_t>();
      float* gp = g.data_ptr<float>();
      for (int64_t j = 0; j < r; ++j) {  // the targets' entries, read before g (maybe x) is written
        const int64_t v = c.target[j] - v0;
        const float c_ent = kEntropy ? tokens.coef_entropy[j] : 0.0f;
        const bool here = v >= 0 && v < rows && (tokens.coef[j] != 0.0f || c_ent != 0.0f);
        float g_target = 0.0f;
        if (here) {
          const float y = static_cast<float>(x[v * r + j]);
          const float lp = log_prob(y, tokens.shift[j], c.spec.s, tokens.log_sum[j]);
          const float h = kEntropy ? tokens.entropy[j] : 0.0f;
          g_target = target_grad<kEntropy>(exp_f32(lp), lp, tokens.coef[j], c_ent, h);
          if constexpr (kCap) g_target *= soft_cap_grad(y, c.spec);
        }
        target_grads[j] = g_target;
      }
      for (int64_t v = 0; v < rows; ++v) {
        row_softmax_grad_columns<kEntropy, kCap>(x + v * r, gp + v * r, r, c.spec, tokens);
      }
      for (int64_t j = 0; j < r; ++j) {
        const int64_t v = c.target[j] - v0;
        if (v >= 0 && v < rows) gp[v * r + j] = target_grads[j];
      }
      if (d_weight.has_value()) {
        at::Tensor dw = d_weight->narrow(0, v0, rows);
        accumulate ? (void)dw.addmm_(g, hidden32) : (void)at::mm_out(dw, g, hidden32);
      }
      if (d_bias.has_value()) {
        at::Tensor db = d_bias->narrow(0, v0, rows);
        accumulate ? (void)db.add_(g.sum(1)) : (void)at::sum_out(db, g, 1);
      }
      part_written ? (void)d_hidden_part.addmm_(g.t(), w32) : (void)at::mm_out(d_hidden_part, g.t(), w32);
      part_written = true;
    }
    if (part_written) d_hidden_parts[at::get_thread_num()] = d_hidden_part;
  });
  sum_in_order(d_hidden_parts, d_hidden.data_ptr<float>(), d_hidden.numel());
}

// -------------------------------------------------------------------------------------------------------------
// argument checks and the ops

void check(bool ok, const char* name, const char* expected) {
  TORCH_CHECK(ok, "gvpo: ", name, " must be ", expected);
}

at::ScalarType logits_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Chunk check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target, double s, double cap, double cap_scale, int64_t block_rows) {
  check(hidden.device().is_cpu() && hidden.dim() == 2 && hidden.is_contiguous(), "hidden",
        "a contiguous (r, H) CPU tensor");
  check(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.stride(1) == 1 &&
            weight.scalar_type() == hidden.scalar_type() && weight.device().is_cpu(),
        "weight", "(V, H) with a contiguous last dimension, on the CPU, in the dtype of hidden");
  if (bias.has_value()) {
    check(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == hidden.scalar_type(),
          "bias", "(V,) in the dtype of hidden");
  }
  check(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == hidden.size(0), "target",
        "a contiguous int64 tensor with one entry per row of hidden");
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t j = 0; j < target.numel(); ++j) {
    TORCH_CHECK(t[j] >= 0, "gvpo: target[", j, "] = ", t[j], " is negative (pass scored tokens only)");
  }
  TORCH_CHECK(s > 0.0 && cap >= 0.0 && (cap == 0.0 || cap_scale > 0.0), "gvpo: s must be > 0 and cap, cap_scale "
              ">= 0 (got ", s, ", ", cap, ", ", cap_scale, ")");
  TORCH_CHECK(block_rows > 0, "gvpo: block_rows must be > 0, got ", block_rows);
  const at::ScalarType logits = logits_dtype(hidden);
  std::optional<at::Tensor> bias_logits;
  if (bias.has_value()) bias_logits = bias->to(logits);
  const Spec spec{static_cast<float>(s), static_cast<float>(cap), static_cast<float>(cap_scale)};
  return Chunk{hidden.to(logits), weight, bias_logits, t, spec, block_rows};
}

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, "gvpo: ", name,
              " must be a contiguous float32 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

void check_logits_t(const std::optional<at::Tensor>& logits_t, const at::Tensor& hidden, int64_t vocab) {
  if (logits_t.has_value()) {
    TORCH_CHECK(logits_t->is_contiguous() && logits_t->scalar_type() == logits_dtype(hidden) &&
                    logits_t->sizes() == at::IntArrayRef({vocab, hidden.size(0)}),
                "gvpo: logits_t must be a contiguous (V, r) tensor, float64 for float64 hidden, else float32");
  }
}

// The data of an optional (r,) float32 tensor, checked; null where it is not given.
float* optional_float(const std::optional<at::Tensor>& t, const char* name, int64_t r) {
  if (!t.has_value()) return nullptr;
  check_float(*t, name, {r});
  return t->data_ptr<float>();
}

void linear_lse(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& target, double s, double cap, double cap_scale, int64_t block_rows,
                const at::Tensor& token_logprob, const at::Tensor& norm, const std::optional<at::Tensor>& logits_t,
                const std::optional<at::Tensor>& entropy) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Chunk c = check_chunk(hidden, weight, bias, target, s, cap, cap_scale, block_rows);
  check_float(token_logprob, "token_logprob", {hidden.size(0)});
  check_float(norm, "norm", {2, hidden.size(0)});
  check_logits_t(logits_t, hidden, weight.size(0));
  float* entropy_out = optional_float(entropy, "entropy", hidden.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gvpo_linear_lse", [&] {
    if (entropy_out != nullptr) {
      linear_lse_kernel<scalar_t, true>(c, token_logprob, norm, logits_t, entropy_out);
    } else {
      linear_lse_kernel<scalar_t, false>(c, token_logprob, norm, logits_t, nullptr);
    }
  });
}

template <typename scalar_t, bool kCap>
void linear_grad_entropy(const Chunk& c, const TokenCoefs& tokens, const std::optional<at::Tensor>& logits_t,
                         const at::Tensor& d_hidden, const std::optional<at::Tensor>& d_weight,
                         const std::optional<at::Tensor>& d_bias, bool accumulate) {
  if (tokens.entropy != nullptr) {
    linear_grad_kernel<scalar_t, true, kCap>(c, tokens, logits_t, d_hidden, d_weight, d_bias, accumulate);
  } else {
    linear_grad_kernel<scalar_t, false, kCap>(c, tokens, logits_t, d_hidden, d_weight, d_bias, accumulate);
  }
}

void linear_grad(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& target, const at::Tensor& norm, const at::Tensor& coef, double s, double cap,
                 double cap_scale, int64_t block_rows, const std::optional<at::Tensor>& logits_t,
                 const at::Tensor& d_hidden, const std::optional<at::Tensor>& d_weight,
                 const std::optional<at::Tensor>& d_bias, bool accumulate, const std::optional<at::Tensor>& entropy,
                 const std::optional<at::Tensor>& coef_entropy) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Chunk c = check_chunk(hidden, weight, bias, target, s, cap, cap_scale, block_rows);
  const int64_t r = hidden.size(0);
  check_float(norm, "norm", {2, r});
  check_float(coef, "coef", {r});
  check_logits_t(logits_t, hidden, weight.size(0));
  check_float(d_hidden, "d_hidden", hidden.sizes());
  if (d_weight.has_value()) check_float(*d_weight, "d_weight", weight.sizes());
  if (d_bias.has_value()) check_float(*d_bias, "d_bias", {weight.size(0)});
  TORCH_CHECK(entropy.has_value() == coef_entropy.has_value(),
              "gvpo: entropy and coef_entropy must be given together");
  const float* norm_data = norm.data_ptr<float>();
  const TokenCoefs tokens{norm_data, norm_data + r, coef.data_ptr<float>(), optional_float(entropy, "entropy", r),
                          optional_float(coef_entropy, "coef_entropy", r)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gvpo_linear_grad", [&] {
    if (c.spec.capped()) {
      linear_grad_entropy<scalar_t, true>(c, tokens, logits_t, d_hidden, d_weight, d_bias, accumulate);
    } else {
      linear_grad_entropy<scalar_t, false>(c, tokens, logits_t, d_hidden, d_weight, d_bias, accumulate);
    }
  });
}

}  // namespace
}  // namespace gvpo

TORCH_LIBRARY_FRAGMENT(gvpo, m) {
  m.def("linear_lse(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, float s, float cap, "
        "float cap_scale, int block_rows, Tensor(a!) token_logprob, Tensor(b!) norm, Tensor(c!)? logits_t, "
        "Tensor(d!)? entropy=None) -> ()");
  m.def("linear_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor norm, Tensor coef, "
        "float s, float cap, float cap_scale, int block_rows, Tensor(a!)? logits_t, Tensor(b!) d_hidden, "
        "Tensor(c!)? d_weight, Tensor(d!)? d_bias, bool accumulate, Tensor? entropy=None, "
        "Tensor? coef_entropy=None) -> ()");
}

TORCH_LIBRARY_IMPL(gvpo, CPU, m) {
  m.impl("linear_lse", &gvpo::linear_lse);
  m.impl("linear_grad", &gvpo::linear_grad);
}
