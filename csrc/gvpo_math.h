// Float32 arithmetic for the GVPO kernels, written as plain loops that the compiler vectorises
// (-O3 -march=native -fopenmp-simd: the `omp simd` reductions let it reorder the sums and maxima, in an order fixed
// at compile time, so every result is the same run to run).
//
// A row's softmax. The kernels see a row of logits x (the LM head's output), transformed into y (y = x, or
// y = cap tanh(x cap_scale) for soft-capped models, see Spec), and z = y s with s = 1 / temperature. A row is
// described by two floats, its shift (the largest y, 0 where all are -inf) and log_sum = log L,
// L = sum_v exp((y_v - shift) s), so that
//
//     log p_v = (y_v - shift) s - log_sum
//
// y_v - shift is exact near the maximum (and exactly 0 at it), so the likeliest token's log-prob is exactly
// -log_sum, whatever |z| is: a single float32 lse = shift s + log_sum of magnitude ~1e4 (small temperatures,
// confident rows) would carry its rounding, an ulp of |lse|, into every probability. The kernels are built with
// -ffp-contract=off, so every pass rounds (y - shift) s the same way; log_prob's one fused multiply-add is written
// out (std::fma).
//
// Infinities. A -inf logit has probability 0. A row whose maximum is -inf (every logit -inf) takes the shift 0
// (no -inf - -inf = NaN in its sum): its sum is 0, its log_sum -inf, and its token log-prob NaN, which is what
// torch.log_softmax gives such a row.
//
// Entropy. H = -sum_v p_v log p_v comes from the same pass, by one more running sum: with d_v = (y_v - shift) s,
// A = sum_v exp(d_v) d_v <= 0 gives H = log L - A / L, a sum of two non-negative terms (no cancellation of lse
// against E[z] where the row is peaked). A column with p = 0 adds exactly 0 to A (never 0 * -inf), and its
// gradient is exactly 0 as well.
//
// exp_f32 and tanh_f32 are the exponential and tanh every kernel uses. The row routines read a row y[0 .. len)
// of float32 values; none of them allocates. They know nothing of tokens, sequences or groups: rows.cpp and
// linear.cpp apply them. Their kEntropy flag adds the entropy's sum (forward) or term (backward); without it they
// are the loss's loops.
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

// tanh(x) in float32, accurate to a few ulp, branch-free (loops calling it vectorise): the odd Taylor polynomial
// of degree 15 where |x| < 0.5 (relative truncation error < 1e-8), else sign(x) (1 - 2 / (exp(2 |x|) + 1)); |x|
// clamped at 20, where tanh is 1 in float32 (no inf arithmetic in the branch not taken; NaN passes through).
inline float tanh_f32(float x_in) {
  float x = x_in < -20.0f ? -20.0f : x_in;
  x = x > 20.0f ? 20.0f : x;
  const float a = x < 0.0f ? -x : x;
  const float u = x * x;
  float p = -0.00145583438705131826f;
  p = p * u + 0.00359212803657248102f;
  p = p * u - 0.00886323552990219656f;
  p = p * u + 0.02186948853615520282f;
  p = p * u - 0.05396825396825396826f;
  p = p * u + 0.13333333333333333333f;
  p = p * u - 0.33333333333333333333f;
  const float small = x + x * (u * p);
  const float large = 1.0f - 2.0f / (exp_f32(a + a) + 1.0f);
  return a < 0.5f ? small : (x < 0.0f ? -large : large);
}

// How a raw logit x becomes y (see the top of this file): cap > 0 soft-caps, y = cap tanh(x cap_scale);
// s = dz/dy. Without a cap, a logit scale is folded into s by the caller.
struct Spec {
  float s, cap, cap_scale;
  bool capped() const { return cap > 0.0f; }
};

// y of every x[0 .. len), in place (only for a capped spec).
inline void soft_cap(float* x, int64_t len, const Spec& spec) {
  const float cap = spec.cap, cap_scale = spec.cap_scale;  // by value: the stores to x may alias spec's floats
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) x[j] = cap * tanh_f32(x[j] * cap_scale);
}

// dy/dx at y for a capped spec: logit_scale (1 - tanh^2) = cap cap_scale (1 - (y / cap)^2).
inline float soft_cap_grad(float y, const Spec& spec) {
  const float t = y / spec.cap;
  return spec.cap * spec.cap_scale * (1.0f - t * t);
}

// max_j x[j] (NaN entries may be skipped here; they still reach the sum of exponentials).
inline float row_max(const float* x, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < len; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// The shift of a row whose running maximum is m: m, or 0 where m is -inf (a row of -inf logits).
inline float lse_shift(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.0f : m; }

// A column's share of the entropy's sum A: e * d for e = exp(d), exactly 0 where e is 0 (d = -inf); NaN stays.
inline float entropy_term(float e, float d) { return e == 0.0f ? 0.0f : e * d; }

// H = log L - A / L from the sums L and A relative to one shift (see the top of this file).
inline float entropy_of(float sum, float weighted) { return std::log(sum) - weighted / sum; }

// The sums of a row relative to `shift`: L = sum_j exp((y[j] - shift) s) and, with kEntropy, the entropy's A.
struct SumExp {
  float sum, weighted;
};

template <bool kEntropy = false>
inline SumExp row_sum_exp(const float* y, int64_t len, float s, float shift) {
  float sum = 0.0f, weighted = 0.0f;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t j = 0; j < len; ++j) {
    const float d = (y[j] - shift) * s;
    const float e = exp_f32(d);
    sum += e;
    if constexpr (kEntropy) weighted += entropy_term(e, d);
  }
  return {sum, weighted};
}

// log p of a transformed logit y in a row of (shift, log_sum): (y - shift) s - log_sum with one rounding after the
// (exact) subtraction; std::fma vectorises here (-fno-math-errno), where a separate multiply and subtract cost the
// loss's backward 9% on fresh gradient buffers.
inline float log_prob(float y, float shift, float s, float log_sum) { return std::fma(y - shift, s, -log_sum); }

// The gradient at one column but for its one-hot part, for p = exp(lp), lp = log p, where the objective holds c_lp
// times the token's log-prob and (kEntropy) c_ent times its entropy h: -c_lp p, + c_ent p (-lp - h) with kEntropy
// (exactly 0 where p is 0: never 0 * inf). The coefficients carry the factor s of dz/dy.
template <bool kEntropy>
inline float softmax_grad(float p, float lp, float c_lp, float c_ent, float h) {
  if constexpr (kEntropy) {
    return p == 0.0f ? 0.0f : p * (-c_ent * (lp + h) - c_lp);
  } else {
    return -c_lp * p;
  }
}

// The gradient at the token's target: c_lp (1 - p) (no cancellation where p is near 1), + the entropy's part.
template <bool kEntropy>
inline float target_grad(float p, float lp, float c_lp, float c_ent, float h) {
  if constexpr (kEntropy) {
    return c_lp * (1.0f - p) + softmax_grad<true>(p, lp, 0.0f, c_ent, h);
  } else {
    return c_lp * (1.0f - p);
  }
}

// out[j] = softmax_grad of y[j] in a row of (shift, log_sum): minus c_lp times the softmax, + the entropy's part
// with kEntropy, times dy/dx with kCap; out may be y itself.
template <bool kEntropy, bool kCap>
inline void row_softmax_grad(const float* y, float* out, int64_t len, const Spec& spec, float shift, float log_sum,
                             float c_lp, float c_ent, float h) {
  const Spec local = spec;  // by value: out may alias y, and a store through out must not make the loop reload spec
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float lp = log_prob(y[j], shift, local.s, log_sum);
    const float g = softmax_grad<kEntropy>(exp_f32(lp), lp, c_lp, c_ent, h);
    out[j] = kCap ? g * soft_cap_grad(y[j], local) : g;
  }
}

}  // namespace gvpo
