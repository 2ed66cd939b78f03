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
// exp_f32 is the exponential every kernel uses. The row routines read a row x[0 .. len) of float32 values and
// a scale s (1 / temperature), and work on z = x * s, the logits divided by the temperature; none of them
// allocates. They know nothing of tokens, sequences or groups: rows.cpp applies them row by row.
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

// sum_j exp(x[j] * s - shift).
inline float row_sum_exp(const float* x, int64_t len, float s, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) sum += exp_f32(x[j] * s - shift);
  return sum;
}

// out[j] = -coef * exp(x[j] * s - lse): minus coef times the softmax; out may be x itself.
inline void row_neg_softmax(const float* x, float* out, int64_t len, float s, float lse, float coef) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) out[j] = -coef * exp_f32(x[j] * s - lse);
}

}  // namespace gvpo
