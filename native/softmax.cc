// Row softmax of float32 scores for difflora::heads_attention on the CPU, and its backward.
//
// libtorch 1.13's CPU softmax spends most of its time in SLEEF's 1-ULP expf (0.43 of 0.79 ns an element on a
// 256-wide row here) and runs rows whose width is not a multiple of 8, such as cross-attention's 77 keys, at half
// speed (1.56 ns an element). The scores of the attention are the largest softmax input of a training step. This
// kernel takes simd::ExpNonPositive and handles a row's tail with masked loads and stores; the backward, one dot
// product and one pass a row, likewise.
#include "softmax.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace difflora {

#ifdef DIFFLORA_HAS_AVX2_KERNELS
namespace {

using namespace simd;

DIFFLORA_AVX2 void SoftmaxRowsAvx2(const float* in, float* out, int64_t rows, int64_t cols) {
  const int64_t full = cols & ~int64_t{7};
  const int tail = static_cast<int>(cols - full);
  const __m256i mask = FirstLanes(tail);
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

DIFFLORA_AVX2 void SoftmaxBackwardRowsAvx2(const float* grad, const float* probs, float* out, int64_t rows, int64_t cols) {
  const int64_t full = cols & ~int64_t{7};
  const int tail = static_cast<int>(cols - full);
  const __m256i mask = FirstLanes(tail);
  for (int64_t row = 0; row < rows; ++row) {
    const float* g = grad + row * cols;
    const float* p = probs + row * cols;
    float* y = out + row * cols;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains: the FMA's latency is not the limit
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j), _mm256_loadu_ps(p + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j + 8), _mm256_loadu_ps(p + j + 8), acc1);
    }
    if (j < full) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j), _mm256_loadu_ps(p + j), acc0);
    if (tail) acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(g + full, mask), _mm256_maskload_ps(p + full, mask), acc1);  // 0 · 0 outside
    const __m256 dot = _mm256_set1_ps(HorizontalSum(_mm256_add_ps(acc0, acc1)));
    for (j = 0; j < full; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(g + j), dot)));
    if (tail) {
      const __m256 pt = _mm256_maskload_ps(p + full, mask), gt = _mm256_maskload_ps(g + full, mask);
      _mm256_maskstore_ps(y + full, mask, _mm256_mul_ps(pt, _mm256_sub_ps(gt, dot)));
    }
  }
}

}  // namespace

// Rows are shared among libtorch's intra-op threads, as ATen's softmax does (grain: ~32K elements a task).
int64_t Grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols)); }

bool SoftmaxBackwardRows(const float* grad, const float* probs, float* out, int64_t rows, int64_t cols) {
  if (!simd::HasAvx2()) return false;
  at::parallel_for(0, rows, Grain(cols), [&](int64_t begin, int64_t end) {
    SoftmaxBackwardRowsAvx2(grad + begin * cols, probs + begin * cols, out + begin * cols, end - begin, cols);
  });
  return true;
}

bool SoftmaxRows(const float* in, float* out, int64_t rows, int64_t cols) {
  if (!simd::HasAvx2()) return false;
  at::parallel_for(0, rows, Grain(cols), [&](int64_t begin, int64_t end) {
    SoftmaxRowsAvx2(in + begin * cols, out + begin * cols, end - begin, cols);
  });
  return true;
}

#else

bool SoftmaxRows(const float*, float*, int64_t, int64_t) { return false; }
bool SoftmaxBackwardRows(const float*, const float*, float*, int64_t, int64_t) { return false; }

#endif

}  // namespace difflora
