// Row softmax of float32 scores with an AVX2 exp, for difflora::heads_attention on the CPU.
//
// libtorch 1.13's CPU softmax spends most of its time in SLEEF's 1-ULP expf (0.43 of 0.79 ns an element on a
// 256-wide row here) and runs rows whose width is not a multiple of 8, such as cross-attention's 77 keys, at half
// speed (1.56 ns an element). The scores of the attention are the largest softmax input of a training step. The exp
// below: Cody-Waite range reduction x = n·ln2 + r with |r| ≤ ln2/2, a degree-7 Taylor polynomial for e^r (its
// truncation error, under 6e-9 relative, is below float rounding, so the result is within a few ULP of e^x), and
// 2^n written into the exponent bits. A row's tail is handled with masked loads and stores, not a scalar loop.
#include "softmax.h"

#include <initializer_list>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DIFFLORA_SOFTMAX_AVX2 1
#endif

namespace difflora {

#ifdef DIFFLORA_SOFTMAX_AVX2
namespace {

#define DIFFLORA_AVX2 __attribute__((target("avx2,fma")))

// Below this e^x is not a normal float: the lane becomes 0 (softmax's x − max is never positive).
constexpr float kExpLowest = -87.33654f;

// e^x for lanes x ≤ 0; -inf gives 0 and NaN stays NaN.
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

DIFFLORA_AVX2 void SoftmaxRowsAvx2(const float* in, float* out, int64_t rows, int64_t cols) {
  const int64_t full = cols & ~int64_t{7};
  const int tail = static_cast<int>(cols - full);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 maskf = _mm256_castsi256_ps(mask);
  const __m256 minusInf = _mm256_set1_ps(-__builtin_inff());
  for (int64_t row = 0; row < rows; ++row) {
    const float* x = in + row * cols;
    float* y = out + row * cols;
    // a NaN anywhere in the row makes its sum, hence the whole row, NaN (as ATen's)
    __m256 vmax = minusInf;
    for (int64_t j = 0; j < full; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
    if (tail) vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(minusInf, _mm256_maskload_ps(x + full, mask), maskf));
    const __m256 max = _mm256_set1_ps(HorizontalMax(vmax));
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), max));
      _mm256_storeu_ps(y + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    if (tail) {
      const __m256 e = _mm256_and_ps(maskf, ExpNonPositive(_mm256_sub_ps(_mm256_maskload_ps(x + full, mask), max)));
      _mm256_maskstore_ps(y + full, mask, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / HorizontalSum(vsum));
    for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), inv));
    if (tail) _mm256_maskstore_ps(y + full, mask, _mm256_mul_ps(_mm256_maskload_ps(y + full, mask), inv));
  }
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

}  // namespace

bool SoftmaxRows(const float* in, float* out, int64_t rows, int64_t cols) {
  if (!HasAvx2()) return false;
  SoftmaxRowsAvx2(in, out, rows, cols);
  return true;
}

#else

bool SoftmaxRows(const float*, float*, int64_t, int64_t) { return false; }

#endif

}  // namespace difflora
