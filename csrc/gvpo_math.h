// Float32 arithmetic for the GVPO kernels, written as plain loops that the compiler vectorises
// (-O3 -march=native -fopenmp-simd: the `omp simd` reductions let it reorder the sums and maxima, in an order fixed
// at compile time, so every result is the same run to run).
//
// Rounding. The kernels are built with -ffp-contract=off: z = x * s is rounded to float32 before anything is
// subtracted from it, the same way in every pass (no std::fma either: it kept GCC from vectorising these loops in
// the extension's build, 6x slower). The largest logit then gives exactly z - max = 0, and the backward's z - lse
// exactly -log(sum) rounded: at a small temperature
// (|z| ~ 1e4 and more), a fused x * s - lse would instead carry the rounding of the product, an error of an ulp
// of |z| in the exponent (0.1% of the probability of the likeliest token at T = 1e-4).
//
// Infinities. A -inf logit has probability 0. A row whose maximum is -inf (every logit -inf) subtracts the shift
// 0 instead of -inf (no -inf - -inf = NaN in its sum): its sum of exponentials is 0, its lse -inf, and its token
// log-prob NaN, which is what torch.log_softmax gives such a row.
//
// Entropy. H = -sum_v p_v log p_v comes from the same pass as the log-sum-exp, by one more running sum: relative
// to a shift m (the maximum), L = sum_v exp(z_v - m) and A = sum_v exp(z_v - m) (z_v - m) <= 0 give
// lse = m + log L and H = log L - A / L (no cancellation of lse against E[z] where the row is peaked). A column
// with p = 0 adds exactly 0 to A (never 0 * -inf), and its gradient is exactly 0 as well.
//
// exp_f32 is the exponential every kernel uses. The row routines read a row x[0 .. len) of float32 values and
// a scale s (1 / temperature), and work on z = x * s, the logits divided by the temperature; none of them
// allocates. They know nothing of tokens, sequences or groups: rows.cpp applies them row by row. Their kEntropy
// flag adds the entropy's sum (forward) or term (backward); without it they are the loss's loops, unchanged.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gvpo {

// exp(x) in float32, accurate to ~2 ulp for x in [-86, 88]; exactly 0 below -86 (so exp(-inf) = 0, and no
// denormal is ever produced), NaN for NaN. Branch-free so that loops calling it vectorise.
//
// exp(x) = 2^n * exp(f) with n = round(x / ln 2) and f = x - n ln 2 in [-ln2 / 2, ln2 / 2]; ln 2 is split in a
// high part with few significant bits (n * kLn2Hi is exact) and a low part. exp(f) is its Taylor polynomial of
// degree 7 (truncation error |f|^8 / 8! < 6e-9). n is read from the low mantissa bits of x / ln 2 + 1.5 * 2^23
// and 2^n is built directly in the exponent field.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 355 / 512
  constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  constexpr float kLow = -86.0f;  // exp(-86) = 4.5e-38, just above the smallest normal float
  constexpr float kHigh = 88.0f;
  float xc = x < kLow ? kLow : x;  // comparisons with NaN are false: NaN passes through
  xc = xc > kHigh ? kHigh : xc;
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  const float f = (xc - n * kLn2Hi) - n * kLn2Lo;  // n * kLn2Hi is exact
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t n_bits, round_bits;
  std::memcpy(&n_bits, &shifted, sizeof(float));
  std::memcpy(&round_bits, &kRound, sizeof(float));
  const int32_t scale_bits = (n_bits - round_bits + 127) << 23;  // 2^n, n in [-125, 127]
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(float));
  return x < kLow ? 0.0f : p * scale;
}

// max_j x[j] (NaN entries may be skipped here; they still reach the sum of exponentials).
inline float row_max(const float* x, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < len; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// The shift that a sum of exp(z - shift) subtracts, for the running maximum m of z: m, or 0 where m is -inf.
inline float lse_shift(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.0f : m; }

// A column's share of the entropy's sum A: e * d for e = exp(d), exactly 0 where e is 0 (d = -inf); NaN stays.
inline float entropy_term(float e, float d) { return e == 0.0f ? 0.0f : e * d; }

// H = log L - A / L from the sums L and A relative to one shift (see the top of this file).
inline float entropy_of(float sum, float weighted) { return std::log(sum) - weighted / sum; }

// The sums of a row relative to `shift`: sum_j exp(x[j] * s - shift) and, with kEntropy, the entropy's A.
struct SumExp {
  float sum, weighted;
};

template <bool kEntropy = false>
inline SumExp row_sum_exp(const float* x, int64_t len, float s, float shift) {
  float sum = 0.0f, weighted = 0.0f;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t j = 0; j < len; ++j) {
    const float d = x[j] * s - shift;
    const float e = exp_f32(d);
    sum += e;
    if constexpr (kEntropy) weighted += entropy_term(e, d);
  }
  return {sum, weighted};
}

// dL/dz_v of one token but for its one-hot part, for p = exp(d), d = z_v - lse, where the loss holds c_lp times
// the token's log-prob and (kEntropy) c_ent times its entropy h: -c_lp p, + c_ent p (-d - h) with kEntropy
// (exactly 0 where p is 0: never 0 * inf).
template <bool kEntropy>
inline float softmax_grad(float p, float d, float c_lp, float c_ent, float h) {
  if constexpr (kEntropy) {
    return p == 0.0f ? 0.0f : p * (-c_ent * (d + h) - c_lp);
  } else {
    return -c_lp * p;
  }
}

// dL/dz_t at the token's target t: c_lp (1 - p) (no cancellation where p is near 1), + the entropy's part.
template <bool kEntropy>
inline float target_grad(float p, float d, float c_lp, float c_ent, float h) {
  if constexpr (kEntropy) {
    return c_lp * (1.0f - p) + softmax_grad<true>(p, d, 0.0f, c_ent, h);
  } else {
    return c_lp * (1.0f - p);
  }
}

// The log-softmax d = z - lse of a logit in a backward pass. The loss's kernels (kEntropy false) pass
// shift = lse and log_sum = 0: d = z - lse. With kEntropy, the logits path passes, where |lse| is large, its
// row's shift (the maximum) and log_sum = log L computed again: d = (z - shift) - log_sum, exact near the maximum
// whatever |z| is, where a float32 lse of |lse| ~ 1e4 (T = 1e-4) would carry its rounding, an ulp of |lse|, into
// every probability and give twice PyTorch's error on rows that are not one-hot (rows.cpp, kExactLse).
template <bool kEntropy>
inline float log_softmax(float z, float shift, float log_sum) {
  if constexpr (kEntropy) {
    return (z - shift) - log_sum;
  } else {
    return z - shift;
  }
}

// out[j] = softmax_grad(exp(d), d, ...) for d = log_softmax(x[j] * s, shift, log_sum): minus c_lp times the
// softmax, + the entropy's part with kEntropy; out may be x itself.
template <bool kEntropy = false>
inline void row_softmax_grad(const float* x, float* out, int64_t len, float s, float shift, float log_sum,
                             float c_lp, float c_ent = 0.0f, float h = 0.0f) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float d = log_softmax<kEntropy>(x[j] * s, shift, log_sum);
    out[j] = softmax_grad<kEntropy>(exp_f32(d), d, c_lp, c_ent, h);
  }
}

}  // namespace gvpo
