// GVPO token kernels on rows of logits (the logits path), registered as torch.library ops in the `gvpo` namespace.
//
// Each op walks the N = B' * T' rows of a (B', T', V) tensor of logits in parallel (at::parallel_for) and applies
// the float32 row routines of gvpo_math.h to y, the row transformed (soft-capped where the spec says so):
//
//   token_forward   norm[0][n] = shift, norm[1][n] = log_sum of row n (gvpo_math.h), token_logprob[n] =
//                   log p of target[n], and where an entropy tensor is given, entropy[n] = H(p), in the same pass
//   token_backward  grad[n] = (coef[n] (onehot(target[n]) - p) + coef_entropy[n] p (-log p - entropy[n])) dy/dx,
//                   p from the forward's norm; the entropy's term where entropy and coef_entropy are given
//
// Rows whose target is negative are not scored: they are never read, their outputs are 0 (token_logprob, norm,
// entropy, and the whole gradient row). A target >= V is scored but lies in another rank's slice of the
// vocabulary: its logit counts as 0 (token_logprob = -shift s - log_sum) and it gets no one-hot. A gradient row
// whose coefficients are all 0 is 0 as well. coef (and coef_entropy) hold the upstream gradient times s
// (for the loss, grad_loss * dL/ds of the row's sequence * s); computing them is the caller's business: kernels
// know no sequences. -inf logits: see gvpo_math.h (as torch.log_softmax does).
//
// Shapes and dtypes: rows (B', T', V) float32, bfloat16, float16 or float64 with a contiguous last dimension
// (other strides free, so logits[:, :-1] is read in place); target (N,) int64; norm (2, N), coef, token_logprob,
// entropy, coef_entropy (N,) float32, contiguous; grad (B', T', V) with a contiguous last dimension, float32 or
// the dtype of rows, and it may be rows itself (the gradient then overwrites the logits). Math is float32
// whatever the dtype; offsets are int64. s, cap, cap_scale: gvpo_math.h's Spec.
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

// Row n as y, float32: the row itself when it is float32 and not capped, else converted (and capped) into
// `scratch` (len floats).
template <typename scalar_t>
const float* load_y(const scalar_t* x, int64_t len, const Spec& spec, float* scratch) {
  if (std::is_same_v<scalar_t, float> && !spec.capped()) return reinterpret_cast<const float*>(x);
  for (int64_t j = 0; j < len; ++j) scratch[j] = static_cast<float>(x[j]);
  if (spec.capped()) soft_cap(scratch, len, spec);
  return scratch;
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

// Rows per parallel task: enough elements that a task outweighs the cost of starting it.
int64_t grain_rows(int64_t vocab) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1));
}

// -------------------------------------------------------------------------------------------------------------
// kernels

// kEntropy: entropy_out (N,) gets each row's entropy (else it is null and nothing more is computed).
template <typename scalar_t, bool kEntropy>
void token_forward_kernel(const at::Tensor& rows, const at::Tensor& target, const Spec& spec,
                          const at::Tensor& token_logprob, const at::Tensor& norm, float* entropy_out) {
  const Rows<scalar_t> x_rows(rows);
  const int64_t vocab = rows.size(2), num_rows = target.numel();
  const int64_t* tgt = target.data_ptr<int64_t>();
  float* logprob_out = token_logprob.data_ptr<float>();
  float* shift_out = norm.data_ptr<float>();
  float* log_sum_out = shift_out + num_rows;
  const bool converts = !std::is_same_v<scalar_t, float> || spec.capped();
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(converts ? vocab : 0);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = tgt[n];
      if (t < 0) {
        logprob_out[n] = shift_out[n] = log_sum_out[n] = 0.0f;
        if constexpr (kEntropy) entropy_out[n] = 0.0f;
        continue;
      }
      const float* y = load_y(x_rows[n], vocab, spec, scratch.data());
      const float shift = lse_shift(row_max(y, vocab));
      const SumExp sums = row_sum_exp<kEntropy>(y, vocab, spec.s, shift);
      const float log_sum = std::log(sums.sum);  // -inf for a row of -inf
      shift_out[n] = shift;
      log_sum_out[n] = log_sum;
      logprob_out[n] = log_prob(t < vocab ? y[t] : 0.0f, shift, spec.s, log_sum);
      if constexpr (kEntropy) entropy_out[n] = entropy_of(sums.sum, sums.weighted);
    }
  });
}

// kEntropy: entropy_in and coef_entropy_in (N,) add the entropy's term (else they are null); kCap: soft-capped.
template <typename scalar_t, typename out_t, bool kEntropy, bool kCap>
void token_backward_kernel(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& norm,
                           const at::Tensor& coef, const Spec& spec, const at::Tensor& grad, const float* entropy_in,
                           const float* coef_entropy_in) {
  const Rows<scalar_t> x_rows(rows);
  const Rows<out_t> g_rows(grad);
  const int64_t vocab = rows.size(2), num_rows = target.numel();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* shift_in = norm.data_ptr<float>();
  const float* log_sum_in = shift_in + num_rows;
  const float* coef_in = coef.data_ptr<float>();
  constexpr bool kScratch = !std::is_same_v<scalar_t, float> || !std::is_same_v<out_t, float> || kCap;
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kScratch ? vocab : 0);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = tgt[n];
      out_t* out = g_rows[n];
      const float c = t < 0 ? 0.0f : coef_in[n];
      const float c_ent = kEntropy && t >= 0 ? coef_entropy_in[n] : 0.0f;
      if (c == 0.0f && c_ent == 0.0f) {  // not scored, or coefficients of 0: never read the logits
        std::fill(out, out + vocab, static_cast<out_t>(0.0f));
        continue;
      }
      const float* y = load_y(x_rows[n], vocab, spec, scratch.data());
      float* g = work_row(out, scratch.data());  // y and g may share memory: each element is read, then written
      const float shift = shift_in[n], log_sum = log_sum_in[n], h = kEntropy ? entropy_in[n] : 0.0f;
      float g_target = 0.0f;
      if (t < vocab) {
        const float lp = log_prob(y[t], shift, spec.s, log_sum);
        g_target = target_grad<kEntropy>(exp_f32(lp), lp, c, c_ent, h);
        if constexpr (kCap) g_target *= soft_cap_grad(y[t], spec);
      }
      row_softmax_grad<kEntropy, kCap>(y, g, vocab, spec, shift, log_sum, c, c_ent, h);
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

void check_per_row(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t num_rows,
                   int64_t per_row = 1) {
  TORCH_CHECK(t.device().is_cpu(), "gvpo: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "gvpo: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == per_row * num_rows, "gvpo: ", name, " must be contiguous with ",
              per_row * num_rows, " elements (", per_row, " per row), got shape ", t.sizes());
}

void check_grad(const at::Tensor& grad, const at::Tensor& rows) {
  check_rows(grad, "grad");
  TORCH_CHECK(grad.sizes() == rows.sizes(), "gvpo: grad must have the shape of rows ", rows.sizes(), ", got ",
              grad.sizes());
  const bool ok = grad.scalar_type() == at::kFloat || grad.scalar_type() == rows.scalar_type();
  TORCH_CHECK(ok, "gvpo: grad must be float32 or the dtype of rows, got ", grad.scalar_type());
}

Spec check_spec(double s, double cap, double cap_scale) {
  TORCH_CHECK(s > 0.0 && cap >= 0.0 && (cap == 0.0 || cap_scale > 0.0), "gvpo: s must be > 0 and cap, cap_scale "
              ">= 0 (got ", s, ", ", cap, ", ", cap_scale, ")");
  return Spec{static_cast<float>(s), static_cast<float>(cap), static_cast<float>(cap_scale)};
}

int64_t check_common(const at::Tensor& rows, const at::Tensor& target) {
  check_rows(rows, "rows");
  const int64_t num_rows = rows.size(0) * rows.size(1);
  check_per_row(target, "target", at::kLong, num_rows);
  return num_rows;
}

// The data of an optional (N,) float32 tensor, checked; null where it is not given.
float* optional_per_row(const std::optional<at::Tensor>& t, const char* name, int64_t num_rows) {
  if (!t.has_value()) return nullptr;
  check_per_row(*t, name, at::kFloat, num_rows);
  return t->data_ptr<float>();
}

void token_forward(const at::Tensor& rows, const at::Tensor& target, double s, double cap, double cap_scale,
                   const at::Tensor& token_logprob, const at::Tensor& norm, const std::optional<at::Tensor>& entropy) {
  const int64_t num_rows = check_common(rows, target);
  const Spec spec = check_spec(s, cap, cap_scale);
  check_per_row(token_logprob, "token_logprob", at::kFloat, num_rows);
  check_per_row(norm, "norm", at::kFloat, num_rows, 2);
  float* entropy_out = optional_per_row(entropy, "entropy", num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "gvpo_token_forward", [&] {
    if (entropy_out != nullptr) {
      token_forward_kernel<scalar_t, true>(rows, target, spec, token_logprob, norm, entropy_out);
    } else {
      token_forward_kernel<scalar_t, false>(rows, target, spec, token_logprob, norm, nullptr);
    }
  });
}

template <typename scalar_t, typename out_t, bool kCap>
void token_backward_entropy(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& norm,
                            const at::Tensor& coef, const Spec& spec, const at::Tensor& grad, const float* entropy_in,
                            const float* coef_entropy_in) {
  if (entropy_in != nullptr) {
    token_backward_kernel<scalar_t, out_t, true, kCap>(rows, target, norm, coef, spec, grad, entropy_in,
                                                       coef_entropy_in);
  } else {
    token_backward_kernel<scalar_t, out_t, false, kCap>(rows, target, norm, coef, spec, grad, nullptr, nullptr);
  }
}

template <typename scalar_t, typename out_t>
void token_backward_dispatch(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& norm,
                             const at::Tensor& coef, const Spec& spec, const at::Tensor& grad,
                             const float* entropy_in, const float* coef_entropy_in) {
  if (spec.capped()) {
    token_backward_entropy<scalar_t, out_t, true>(rows, target, norm, coef, spec, grad, entropy_in, coef_entropy_in);
  } else {
    token_backward_entropy<scalar_t, out_t, false>(rows, target, norm, coef, spec, grad, entropy_in,
                                                   coef_entropy_in);
  }
}

void token_backward(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& norm, const at::Tensor& coef,
                    double s, double cap, double cap_scale, const at::Tensor& grad,
                    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& coef_entropy) {
  const int64_t num_rows = check_common(rows, target);
  const Spec spec = check_spec(s, cap, cap_scale);
  check_per_row(norm, "norm", at::kFloat, num_rows, 2);
  check_per_row(coef, "coef", at::kFloat, num_rows);
  check_grad(grad, rows);
  TORCH_CHECK(entropy.has_value() == coef_entropy.has_value(),
              "gvpo: entropy and coef_entropy must be given together");
  const float* entropy_in = optional_per_row(entropy, "entropy", num_rows);
  const float* coef_entropy_in = optional_per_row(coef_entropy, "coef_entropy", num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "gvpo_token_backward", [&] {
    if (grad.scalar_type() == at::kFloat) {
      token_backward_dispatch<scalar_t, float>(rows, target, norm, coef, spec, grad, entropy_in, coef_entropy_in);
    } else {
      token_backward_dispatch<scalar_t, scalar_t>(rows, target, norm, coef, spec, grad, entropy_in,
                                                  coef_entropy_in);
    }
  });
}

}  // namespace
}  // namespace gvpo

TORCH_LIBRARY_FRAGMENT(gvpo, m) {
  m.def("token_forward(Tensor rows, Tensor target, float s, float cap, float cap_scale, Tensor(a!) token_logprob, "
        "Tensor(b!) norm, Tensor(c!)? entropy=None) -> ()");
  m.def("token_backward(Tensor rows, Tensor target, Tensor norm, Tensor coef, float s, float cap, float cap_scale, "
        "Tensor(a!) grad, Tensor? entropy=None, Tensor? coef_entropy=None) -> ()");
}

TORCH_LIBRARY_IMPL(gvpo, CPU, m) {
  m.impl("token_forward", &gvpo::token_forward);
  m.impl("token_backward", &gvpo::token_backward);
}
