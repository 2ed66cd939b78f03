// GVPO token kernels on rows of logits (the logits path), registered as torch.library ops in the `gvpo` namespace.
//
// Each op walks the N = B' * T' rows of a (B', T', V) tensor of logits in parallel (at::parallel_for) and applies
// the float32 row routines of gvpo_math.h:
//
//   token_forward   lse[n] = logsumexp(rows[n] / T), token_logprob[n] = rows[n, target[n]] / T - lse[n], and
//                   where an entropy tensor is given, entropy[n] = H(softmax(rows[n] / T)), in the same pass
//   token_backward  grad[n] = coef[n] * (onehot(target[n]) - p), p = exp(rows[n] / T - lse[n]), and where
//                   entropy and coef_entropy are given, + coef_entropy[n] * p * (lse[n] - rows[n] / T - entropy[n])
//                   (the gradient of coef * token_logprob + coef_entropy * entropy in rows / T); the entropy's
//                   variant computes a row's lse again where |lse| >= kExactLse (gvpo_math.h, log_softmax)
//
// Rows whose target is negative are not scored: they are never read, their outputs are 0 (token_logprob, lse,
// entropy, and the whole gradient row). A target >= V is scored but lies in another rank's slice of the
// vocabulary: its logit counts as 0 (token_logprob = -lse) and it gets no one-hot. A gradient row whose
// coefficients are all 0 is 0 as well. coef (and coef_entropy) hold the upstream gradient / T (for the loss,
// grad_loss * dL/ds of the row's sequence / T); computing them is the caller's business (gvpo_kernels/cpu.py):
// kernels know no sequences. -inf logits: see gvpo_math.h (as torch.log_softmax does).
//
// Shapes and dtypes: rows (B', T', V) float32, bfloat16, float16 or float64 with a contiguous last dimension
// (other strides free, so logits[:, :-1] is read in place); target (N,) int64; coef, lse, token_logprob,
// entropy, coef_entropy (N,) float32; grad (B', T', V) with a contiguous last dimension, float32 or the dtype of rows, and it may be rows
// itself (the gradient then overwrites the logits). Math is float32 whatever the dtype; offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "gvpo_math.h"

namespace gvpo {
namespace {

// Row n of a (B', T', V) tensor: flat row n is (n / T', n % T').
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t seq_len, stride_b, stride_t;

  explicit Rows(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), seq_len(t.size(1)), stride_b(t.stride(0)), stride_t(t.stride(1)) {}

  scalar_t* operator[](int64_t n) const {
    const int64_t b = n / seq_len;
    return data + b * stride_b + (n - b * seq_len) * stride_t;
  }
};

// The row as float32: itself when it is float32, else converted into `scratch` (len floats).
template <typename scalar_t>
const float* load_row(const scalar_t* x, int64_t len, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t j = 0; j < len; ++j) scratch[j] = static_cast<float>(x[j]);
    return scratch;
  }
}

// Where to compute a gradient row: `out` itself when it is float32, else `scratch`, stored by store_row.
template <typename out_t>
float* work_row(out_t* out, float* scratch) {
  if constexpr (std::is_same_v<out_t, float>) {
    return out;
  } else {
    return scratch;
  }
}

template <typename out_t>
void store_row(const float* g, out_t* out, int64_t len) {
  if constexpr (!std::is_same_v<out_t, float>) {
    for (int64_t j = 0; j < len; ++j) out[j] = static_cast<out_t>(g[j]);
  }
}

// The entropy's backward reads the forward's lse where |lse| < kExactLse: its rounding (at most 4e-6 relative in
// every probability) is then within PyTorch's own error at logits of that size. Beyond (small temperatures), it
// computes the row's shift and log-sum again (gvpo_math.h, log_softmax).
constexpr float kExactLse = 64.0f;

// Rows per parallel task: enough elements that a task outweighs the cost of starting it.
int64_t grain_rows(int64_t vocab) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1));
}

// -------------------------------------------------------------------------------------------------------------
// kernels

// kEntropy: entropy_out (N,) gets each row's entropy (else it is null and nothing more is computed).
template <typename scalar_t, bool kEntropy>
void token_forward_kernel(const at::Tensor& rows, const at::Tensor& target, double inv_temperature,
                          const at::Tensor& token_logprob, const at::Tensor& lse, float* entropy_out) {
  const Rows<scalar_t> x_rows(rows);
  const int64_t vocab = rows.size(2), num_rows = target.numel();
  const int64_t* tgt = target.data_ptr<int64_t>();
  float* logprob_out = token_logprob.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const float s = static_cast<float>(inv_temperature);
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<scalar_t, float> ? 0 : vocab);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = tgt[n];
      if (t < 0) {
        logprob_out[n] = 0.0f;
        lse_out[n] = 0.0f;
        if constexpr (kEntropy) entropy_out[n] = 0.0f;
        continue;
      }
      const float* x = load_row(x_rows[n], vocab, scratch.data());
      const float shift = lse_shift(row_max(x, vocab) * s);
      const SumExp sums = row_sum_exp<kEntropy>(x, vocab, s, shift);
      const float l = shift + std::log(sums.sum);  // -inf for a row of -inf
      lse_out[n] = l;
      logprob_out[n] = (t < vocab ? x[t] * s : 0.0f) - l;
      if constexpr (kEntropy) entropy_out[n] = entropy_of(sums.sum, sums.weighted);
    }
  });
}

// kEntropy: entropy_in and coef_entropy_in (N,) add the entropy's term (else they are null).
template <typename scalar_t, typename out_t, bool kEntropy>
void token_backward_kernel(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& coef, double inv_temperature, const at::Tensor& grad,
                           const float* entropy_in, const float* coef_entropy_in) {
  const Rows<scalar_t> x_rows(rows);
  const Rows<out_t> g_rows(grad);
  const int64_t vocab = rows.size(2), num_rows = target.numel();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* lse_in = lse.data_ptr<float>();
  const float* coef_in = coef.data_ptr<float>();
  const float s = static_cast<float>(inv_temperature);
  constexpr bool kConvertIn = !std::is_same_v<scalar_t, float>;
  constexpr bool kConvertOut = !std::is_same_v<out_t, float>;
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((kConvertIn || kConvertOut) ? vocab : 0);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = tgt[n];
      out_t* out = g_rows[n];
      const float c = t < 0 ? 0.0f : coef_in[n];
      const float c_ent = kEntropy && t >= 0 ? coef_entropy_in[n] : 0.0f;
      if (c == 0.0f && c_ent == 0.0f) {  // not scored, or coefficients of 0: never read the logits
        std::fill(out, out + vocab, static_cast<out_t>(0.0f));
        continue;
      }
      const float* x = load_row(x_rows[n], vocab, scratch.data());
      float* g = work_row(out, scratch.data());  // x and g may share memory: each element is read, then written
      float shift = lse_in[n], log_sum = 0.0f;  // see log_softmax in gvpo_math.h
      if constexpr (kEntropy) {
        if (!(std::fabs(shift) < kExactLse)) {  // the forward's shift and sum again: two passes, one exp per logit
          shift = lse_shift(row_max(x, vocab) * s);
          log_sum = std::log(row_sum_exp(x, vocab, s, shift).sum);
        }
      }
      const float h = kEntropy ? entropy_in[n] : 0.0f;
      const float d_target = t < vocab ? log_softmax<kEntropy>(x[t] * s, shift, log_sum) : 0.0f;
      const float g_target = target_grad<kEntropy>(t < vocab ? exp_f32(d_target) : 0.0f, d_target, c, c_ent, h);
      row_softmax_grad<kEntropy>(x, g, vocab, s, shift, log_sum, c, c_ent, h);
      if (t < vocab) g[t] = g_target;
      store_row(g, out, vocab);
    }
  });
}

// -------------------------------------------------------------------------------------------------------------
// argument checks and the ops

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "gvpo: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "gvpo: ", name, " must be (B', T', V), got ", t.dim(), " dimensions");
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "gvpo: ", name, " must have a contiguous last dimension");
}

void check_per_row(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t num_rows) {
  TORCH_CHECK(t.device().is_cpu(), "gvpo: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "gvpo: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == num_rows, "gvpo: ", name, " must be contiguous with ",
              num_rows, " elements (one per row), got shape ", t.sizes());
}

void check_grad(const at::Tensor& grad, const at::Tensor& rows) {
  check_rows(grad, "grad");
  TORCH_CHECK(grad.sizes() == rows.sizes(), "gvpo: grad must have the shape of rows ", rows.sizes(), ", got ",
              grad.sizes());
  const bool ok = grad.scalar_type() == at::kFloat || grad.scalar_type() == rows.scalar_type();
  TORCH_CHECK(ok, "gvpo: grad must be float32 or the dtype of rows, got ", grad.scalar_type());
}

int64_t check_common(const at::Tensor& rows, const at::Tensor& target, double inv_temperature) {
  check_rows(rows, "rows");
  const int64_t num_rows = rows.size(0) * rows.size(1);
  check_per_row(target, "target", at::kLong, num_rows);
  TORCH_CHECK(inv_temperature > 0.0, "gvpo: inv_temperature must be > 0, got ", inv_temperature);
  return num_rows;
}

// The data of an optional (N,) float32 tensor, checked; null where it is not given.
float* optional_per_row(const std::optional<at::Tensor>& t, const char* name, int64_t num_rows) {
  if (!t.has_value()) return nullptr;
  check_per_row(*t, name, at::kFloat, num_rows);
  return t->data_ptr<float>();
}

void token_forward(const at::Tensor& rows, const at::Tensor& target, double inv_temperature,
                   const at::Tensor& token_logprob, const at::Tensor& lse, const std::optional<at::Tensor>& entropy) {
  const int64_t num_rows = check_common(rows, target, inv_temperature);
  check_per_row(token_logprob, "token_logprob", at::kFloat, num_rows);
  check_per_row(lse, "lse", at::kFloat, num_rows);
  float* entropy_out = optional_per_row(entropy, "entropy", num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "gvpo_token_forward", [&] {
    if (entropy_out != nullptr) {
      token_forward_kernel<scalar_t, true>(rows, target, inv_temperature, token_logprob, lse, entropy_out);
    } else {
      token_forward_kernel<scalar_t, false>(rows, target, inv_temperature, token_logprob, lse, nullptr);
    }
  });
}

template <typename scalar_t, typename out_t>
void token_backward_dispatch(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& lse,
                             const at::Tensor& coef, double inv_temperature, const at::Tensor& grad,
                             const float* entropy_in, const float* coef_entropy_in) {
  if (entropy_in != nullptr) {
    token_backward_kernel<scalar_t, out_t, true>(rows, target, lse, coef, inv_temperature, grad, entropy_in,
                                                 coef_entropy_in);
  } else {
    token_backward_kernel<scalar_t, out_t, false>(rows, target, lse, coef, inv_temperature, grad, nullptr,
                                                  nullptr);
  }
}

void token_backward(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& coef,
                    double inv_temperature, const at::Tensor& grad, const std::optional<at::Tensor>& entropy,
                    const std::optional<at::Tensor>& coef_entropy) {
  const int64_t num_rows = check_common(rows, target, inv_temperature);
  check_per_row(lse, "lse", at::kFloat, num_rows);
  check_per_row(coef, "coef", at::kFloat, num_rows);
  check_grad(grad, rows);
  TORCH_CHECK(entropy.has_value() == coef_entropy.has_value(),
              "gvpo: entropy and coef_entropy must be given together");
  const float* entropy_in = optional_per_row(entropy, "entropy", num_rows);
  const float* coef_entropy_in = optional_per_row(coef_entropy, "coef_entropy", num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "gvpo_token_backward", [&] {
    if (grad.scalar_type() == at::kFloat) {
      token_backward_dispatch<scalar_t, float>(rows, target, lse, coef, inv_temperature, grad, entropy_in,
                                               coef_entropy_in);
    } else {
      token_backward_dispatch<scalar_t, scalar_t>(rows, target, lse, coef, inv_temperature, grad, entropy_in,
                                                  coef_entropy_in);
    }
  });
}

}  // namespace
}  // namespace gvpo

TORCH_LIBRARY_FRAGMENT(gvpo, m) {
  m.def("token_forward(Tensor rows, Tensor target, float inv_temperature, Tensor(a!) token_logprob, "
        "Tensor(b!) lse, Tensor(c!)? entropy=None) -> ()");
  m.def("token_backward(Tensor rows, Tensor target, Tensor lse, Tensor coef, float inv_temperature, "
        "Tensor(a!) grad, Tensor? entropy=None, Tensor? coef_entropy=None) -> ()");
}

TORCH_LIBRARY_IMPL(gvpo, CPU, m) {
  m.impl("token_forward", &gvpo::token_forward);
  m.impl("token_backward", &gvpo::token_backward);
}
