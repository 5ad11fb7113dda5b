// AVX2 building blocks shared by the CPU float32 kernels that replace libtorch 1.13's where its vector math is the
// cost (native/softmax.cc, native/group_norm.cc). Each kernel is compiled for AVX2 + FMA through function target
// attributes, not for the whole addon, and is only called where HasAvx2() says the CPU has them.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <initializer_list>

#define DIFFLORA_HAS_AVX2_KERNELS 1
#define DIFFLORA_AVX2 __attribute__((target("avx2,fma")))

namespace difflora::simd {

inline bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// Below this e^x is not a normal float: the lane becomes 0.
constexpr float kExpLowest = -87.33654f;

// e^x for lanes x ≤ 0 (softmax's x − max, sigmoid's −|y|); -inf gives 0 and NaN stays NaN. libtorch 1.13 spends most
// of its softmax and silu time in SLEEF's 1-ULP expf; this one: Cody-Waite range reduction x = n·ln2 + r with
// |r| ≤ ln2/2, a degree-7 Taylor polynomial for e^r (its truncation error, under 6e-9 relative, is below float
// rounding, so the result is within a few ULP of e^x), and 2^n written into the exponent bits.
DIFFLORA_AVX2 inline __m256 ExpNonPositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLowest), _CMP_LT_OQ);  // false for NaN
  x = _mm256_max_ps(_mm256_set1_ps(kExpLowest), x);  // max returns its second operand for NaN: NaN is kept
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x − n·ln2, ln2 split in a part exact in n·ln2_hi and the rest
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));  // n ≥ -126: a normal 2^n
  const __m256 twoN = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, twoN));
}

DIFFLORA_AVX2 inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

DIFFLORA_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The lanes [0, n) of a vector, for a row's tail of n < 8 elements (masked loads and stores, no scalar loop).
DIFFLORA_AVX2 inline __m256i FirstLanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

}  // namespace difflora::simd

#endif
