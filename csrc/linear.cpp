// GVPO's linear path on the CPU, logits = hidden @ weight.T + bias never held whole, as torch.library ops in `gvpo`.
//
// For a chunk of r scored tokens (hidden (r, H), gathered by gvpo_kernels/cpu.py, which also picks the schedule):
//
//   linear_lse   token_logprob, lse (r,): the log-softmax of each token's logits / T at its target
//   linear_grad  dL/dlogits = coef * (onehot(target) - exp(logits / T - lse)), contracted at once into
//                d_hidden (r, H), d_weight (V, H) and d_bias (V,) (float32, accumulated over chunks or not)
//
// Each thread owns a contiguous range of vocabulary rows (at::parallel_for over V: one parallel region per op,
// whatever the sizes: on a machine shared with other work, every parallel region waits for a core) and walks it in blocks of block_rows rows. A block's logits are computed *transposed*,
// z = weight[v0:v1] @ hidden.T (+ bias), (rows, r), by a one-thread GEMM into the thread's own buffer (block_rows
// x r, sized by the caller to stay in L2), and consumed at once while in cache:
//   - linear_lse folds them into the thread's running maximum and sum of exponentials per token, tile by tile
//     (kTileRows rows in L1: their maximum first, the running sum rescaled once where it grew, then one exp per
//     logit), and picks the target's logit where it lies in the block; the threads' partials are merged after.
//   - linear_grad turns them into dL/dlogits (in place when float32), then d_weight[v0:v1] (+)= g @ hidden and
//     d_bias[v0:v1] (+)= row sums (rows the thread owns), and its own float32 d_hidden accumulator += g.T @ weight
//     [v0:v1], which it adds into d_hidden at the end (one thread at a time).
// Where the caller keeps the chunk's logits (logits_t, (V, r): the three-GEMM schedules, whose coefficients are
// known once the log-sum-exps are), linear_lse writes them there and linear_grad reads them instead of computing
// them again.
//
// Shapes and dtypes: hidden (r, H) contiguous, weight (V, H) with a contiguous last dimension, bias (V,); all one
// dtype: float32, bfloat16, float16 or float64 (GEMMs in it, everything else float32). target (r,) int64 >= 0
// (>= V: the label lies in another rank's slice of the vocabulary, its logit counts as 0 and it gets no one-hot); token_logprob, lse, coef (r,) float32; logits_t (V, r) contiguous in the input dtype; d_hidden (r, H),
// d_weight (V, H), d_bias (V,) contiguous float32. coef[t] = 0 gives token t no gradient.
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
#include <mutex>
#include <optional>
#include <vector>

#include "gvpo_math.h"

namespace gvpo {
namespace {

constexpr int64_t kTileRows = 32;  // vocabulary rows per tile of linear_lse: kTileRows x r floats in L1

// The running log-sum-exp of tokens [0, width) over `rows` rows of a transposed block x (row stride ld): m (scaled
// by s) and acc, with one exp per logit.
template <typename scalar_t>
void fold_lse(const scalar_t* x, int64_t ld, int64_t rows, int64_t width, float s, float* m, float* acc,
              float* tile_max) {
  for (int64_t v0 = 0; v0 < rows; v0 += kTileRows) {
    const int64_t v1 = std::min(v0 + kTileRows, rows);
    std::fill(tile_max, tile_max + width, -std::numeric_limits<float>::infinity());
    for (int64_t v = v0; v < v1; ++v) {
      const scalar_t* row = x + v * ld;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const float z = static_cast<float>(row[j]);
        tile_max[j] = z > tile_max[j] ? z : tile_max[j];
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const float grown = tile_max[j] * s > m[j] ? tile_max[j] * s : m[j];
      acc[j] *= grown == m[j] ? 1.0f : exp_f32(m[j] - grown);  // (equal also when both are -inf)
      m[j] = grown;
    }
    for (int64_t v = v0; v < v1; ++v) {
      const scalar_t* row = x + v * ld;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) acc[j] += exp_f32(static_cast<float>(row[j]) * s - m[j]);
    }
  }
}

// One row of a transposed block, as its part of every token's gradient: out[j] = -c[j] * exp(x[j] * s - lse[j]),
// 0 where c[j] is 0 (never -c times garbage); out may be x.
template <typename scalar_t>
void row_neg_softmax_columns(const scalar_t* x, float* out, int64_t width, float s, const float* lse, const float* c) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const float e = exp_f32(static_cast<float>(x[j]) * s - lse[j]);
    out[j] = c[j] == 0.0f ? 0.0f : -c[j] * e;
  }
}

struct Chunk {
  const at::Tensor& hidden;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const int64_t* target;
  float s;  // 1 / temperature
  int64_t block_rows;
};

// z = weight[v0:v0 + rows] @ hidden.T (+ bias[v0:v0 + rows]), into z (rows, r).
void block_logits(const Chunk& c, int64_t v0, int64_t rows, at::Tensor& z) {
  const at::Tensor w = c.weight.narrow(0, v0, rows);
  if (c.bias.has_value()) {
    at::addmm_out(z, c.bias->narrow(0, v0, rows).unsqueeze(1), w, c.hidden.t());
  } else {
    at::mm_out(z, w, c.hidden.t());
  }
}

template <typename scalar_t>
void linear_lse_kernel(const Chunk& c, const at::Tensor& token_logprob, const at::Tensor& lse,
                       const std::optional<at::Tensor>& logits_t) {
  const int64_t r = c.hidden.size(0), vocab = c.weight.size(0);
  const int64_t threads = at::get_num_threads();
  // Per thread: running maximum, running sum, target logit (r each); a thread that gets no rows leaves them as is.
  std::vector<float> partial(threads * 3 * r, 0.0f);
  for (int64_t t = 0; t < threads; ++t) {
    std::fill_n(partial.data() + t * 3 * r, r, -std::numeric_limits<float>::infinity());
  }
  at::parallel_for(0, vocab, c.block_rows, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // thread-local: the workers' ATen calls skip autograd too
    float* m = partial.data() + at::get_thread_num() * 3 * r;
    float* acc = m + r;
    float* label = acc + r;
    std::vector<float> tile_max(r);
    at::Tensor buffer = logits_t.has_value() ? at::Tensor() : at::empty({c.block_rows, r}, c.hidden.options());
    for (int64_t v0 = begin; v0 < end; v0 += c.block_rows) {
      const int64_t rows = std::min(c.block_rows, end - v0);
      at::Tensor z = logits_t.has_value() ? logits_t->narrow(0, v0, rows) : buffer.narrow(0, 0, rows);
      block_logits(c, v0, rows, z);
      const scalar_t* x = z.data_ptr<scalar_t>();
      fold_lse(x, r, rows, r, c.s, m, acc, tile_max.data());
      for (int64_t j = 0; j < r; ++j) {
        const int64_t v = c.target[j] - v0;
        if (v >= 0 && v < rows) label[j] = static_cast<float>(x[v * r + j]) * c.s;
      }
    }
  });
  float* logprob_out = token_logprob.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  for (int64_t j = 0; j < r; ++j) {  // merge the threads' partials
    float m = -std::numeric_limits<float>::infinity(), label = 0.0f;
    for (int64_t t = 0; t < threads; ++t) m = std::max(m, partial[t * 3 * r + j]);
    float sum = 0.0f;
    for (int64_t t = 0; t < threads; ++t) {
      const float* p = partial.data() + t * 3 * r;
      if (p[r + j] > 0.0f) sum += p[r + j] * exp_f32(p[j] - m);
      label += p[2 * r + j];
    }
    lse_out[j] = m + std::log(sum);
    logprob_out[j] = label - lse_out[j];
  }
}

template <typename scalar_t>
void linear_grad_kernel(const Chunk& c, const at::Tensor& lse, const at::Tensor& coef,
                        const std::optional<at::Tensor>& logits_t, const at::Tensor& d_hidden,
                        const std::optional<at::Tensor>& d_weight, const std::optional<at::Tensor>& d_bias,
                        bool accumulate) {
  const int64_t r = c.hidden.size(0), vocab = c.weight.size(0), hidden_size = c.hidden.size(1);
  constexpr bool kFloat32 = std::is_same_v<scalar_t, float>;
  const at::Tensor hidden32 = c.hidden.to(at::kFloat);  // the float32 gradient meets float32 operands
  const float* lse_in = lse.data_ptr<float>();
  const float* coef_in = coef.data_ptr<float>();
  std::mutex merge;  // the threads add their d_hidden into the output one at a time, the first one copying
  bool d_hidden_written = false;
  at::parallel_for(0, vocab, c.block_rows, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // thread-local: the workers' ATen calls skip autograd too
    at::Tensor d_hidden_part = at::empty({r, hidden_size}, hidden32.options());
    bool part_written = false;
    at::Tensor buffer = logits_t.has_value() ? at::Tensor() : at::empty({c.block_rows, r}, c.hidden.options());
    at::Tensor grad_buffer = kFloat32 ? at::Tensor() : at::empty({c.block_rows, r}, hidden32.options());
    std::vector<float> target_grad(r);
    for (int64_t v0 = begin; v0 < end; v0 += c.block_rows) {
      const int64_t rows = std::min(c.block_rows, end - v0);
      at::Tensor z = logits_t.has_value() ? logits_t->narrow(0, v0, rows) : buffer.narrow(0, 0, rows);
      if (!logits_t.has_value()) block_logits(c, v0, rows, z);
      at::Tensor g = kFloat32 ? z : grad_buffer.narrow(0, 0, rows);
      const scalar_t* x = z.data_ptr<scalar_t>();
      float* gp = g.data_ptr<float>();
      for (int64_t j = 0; j < r; ++j) {  // the targets' entries, read before g (maybe x) is written
        const int64_t v = c.target[j] - v0;
        const bool here = v >= 0 && v < rows && coef_in[j] != 0.0f;
        target_grad[j] = here ? coef_in[j] * (1.0f - exp_f32(static_cast<float>(x[v * r + j]) * c.s - lse_in[j])) : 0.0f;
      }
      for (int64_t v = 0; v < rows; ++v) row_neg_softmax_columns(x + v * r, gp + v * r, r, c.s, lse_in, coef_in);
      for (int64_t j = 0; j < r; ++j) {
        const int64_t v = c.target[j] - v0;
        if (v >= 0 && v < rows) gp[v * r + j] = target_grad[j];
      }
      if (d_weight.has_value()) {
        at::Tensor dw = d_weight->narrow(0, v0, rows);
        accumulate ? (void)dw.addmm_(g, hidden32) : (void)at::mm_out(dw, g, hidden32);
      }
      if (d_bias.has_value()) {
        at::Tensor db = d_bias->narrow(0, v0, rows);
        accumulate ? (void)db.add_(g.sum(1)) : (void)at::sum_out(db, g, 1);
      }
      const at::Tensor w = c.weight.narrow(0, v0, rows);
      part_written ? (void)d_hidden_part.addmm_(g.t(), kFloat32 ? w : w.to(at::kFloat))
                   : (void)at::mm_out(d_hidden_part, g.t(), kFloat32 ? w : w.to(at::kFloat));
      part_written = true;
    }
    if (!part_written) return;
    const float* part = d_hidden_part.data_ptr<float>();
    float* out = d_hidden.data_ptr<float>();
    const int64_t size = r * hidden_size;
    std::lock_guard<std::mutex> lock(merge);
    if (d_hidden_written) {
#pragma omp simd
      for (int64_t i = 0; i < size; ++i) out[i] += part[i];
    } else {
      std::copy(part, part + size, out);
      d_hidden_written = true;
    }
  });
  if (!d_hidden_written) std::fill(d_hidden.data_ptr<float>(), d_hidden.data_ptr<float>() + d_hidden.numel(), 0.0f);
}

// -------------------------------------------------------------------------------------------------------------
// argument checks and the ops

void check(bool ok, const char* name, const char* expected) {
  TORCH_CHECK(ok, "gvpo: ", name, " must be ", expected);
}

Chunk check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target, double inv_temperature, int64_t block_rows) {
  check(hidden.device().is_cpu() && hidden.dim() == 2 && hidden.is_contiguous(), "hidden", "a contiguous (r, H) CPU tensor");
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
  TORCH_CHECK(inv_temperature > 0.0, "gvpo: inv_temperature must be > 0, got ", inv_temperature);
  TORCH_CHECK(block_rows > 0, "gvpo: block_rows must be > 0, got ", block_rows);
  return Chunk{hidden, weight, bias, t, static_cast<float>(inv_temperature), block_rows};
}

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, "gvpo: ", name,
              " must be a contiguous float32 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

void check_logits_t(const std::optional<at::Tensor>& logits_t, const at::Tensor& hidden, int64_t vocab) {
  if (logits_t.has_value()) {
    TORCH_CHECK(logits_t->is_contiguous() && logits_t->scalar_type() == hidden.scalar_type() &&
                    logits_t->sizes() == at::IntArrayRef({vocab, hidden.size(0)}),
                "gvpo: logits_t must be a contiguous (V, r) tensor in the dtype of hidden");
  }
}

void linear_lse(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& target, double inv_temperature, int64_t block_rows, const at::Tensor& token_logprob,
                const at::Tensor& lse, const std::optional<at::Tensor>& logits_t) {
  const Chunk c = check_chunk(hidden, weight, bias, target, inv_temperature, block_rows);
  check_float(token_logprob, "token_logprob", {hidden.size(0)});
  check_float(lse, "lse", {hidden.size(0)});
  check_logits_t(logits_t, hidden, weight.size(0));
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gvpo_linear_lse", [&] {
    linear_lse_kernel<scalar_t>(c, token_logprob, lse, logits_t);
  });
}

void linear_grad(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& target, const at::Tensor& lse, const at::Tensor& coef, double inv_temperature,
                 int64_t block_rows, const std::optional<at::Tensor>& logits_t, const at::Tensor& d_hidden,
                 const std::optional<at::Tensor>& d_weight, const std::optional<at::Tensor>& d_bias,
                 bool accumulate) {
  const Chunk c = check_chunk(hidden, weight, bias, target, inv_temperature, block_rows);
  check_float(lse, "lse", {hidden.size(0)});
  check_float(coef, "coef", {hidden.size(0)});
  check_logits_t(logits_t, hidden, weight.size(0));
  check_float(d_hidden, "d_hidden", hidden.sizes());
  if (d_weight.has_value()) check_float(*d_weight, "d_weight", weight.sizes());
  if (d_bias.has_value()) check_float(*d_bias, "d_bias", {weight.size(0)});
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gvpo_linear_grad", [&] {
    linear_grad_kernel<scalar_t>(c, lse, coef, logits_t, d_hidden, d_weight, d_bias, accumulate);
  });
}

}  // namespace
}  // namespace gvpo

TORCH_LIBRARY_FRAGMENT(gvpo, m) {
  m.def("linear_lse(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, float inv_temperature, "
        "int block_rows, Tensor(a!) token_logprob, Tensor(b!) lse, Tensor(c!)? logits_t) -> ()");
  m.def("linear_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor lse, Tensor coef, "
        "float inv_temperature, int block_rows, Tensor(a!)? logits_t, Tensor(b!) d_hidden, Tensor(c!)? d_weight, "
        "Tensor(d!)? d_bias, bool accumulate) -> ()");
}

TORCH_LIBRARY_IMPL(gvpo, CPU, m) {
  m.impl("linear_lse", &gvpo::linear_lse);
  m.impl("linear_grad", &gvpo::linear_grad);
}
