// difflora::group_norm_silu: silu(group_norm(x)), the pair every ResnetBlock2D and the VAE's and UNet's output heads
// run. Where no gradient is needed (frozen models and inference: the VAE's encode in training, every generate) it is
// one pass per group; where one is, the two ATen operators, which autograd records.
//
// libtorch 1.13 runs it as two operators on the CPU: group_norm (0.4–0.5 ns an element on the VAE's shapes here)
// writes its output, then silu_ reads and rewrites it with SLEEF's expf (0.5 ns an element). On a row-major float32
// CPU tensor this kernel takes one group at a time while it is in cache: its mean, then its variance as the mean
// squared deviation (both summed in double), then y = (x − mean)·rstd·γ + β per channel, with the mean carried as two
// floats so that a mean far from 0 costs no precision, and silu(y) = y·σ(y) with σ from simd::ExpNonPositive(−|y|),
// written once. Elsewhere without a gradient (another dtype or device, a strided layout, a CPU without AVX2) it is
// group_norm then silu_ in ATen.
#include "common.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace difflora {
namespace {

#ifdef DIFFLORA_HAS_AVX2_KERNELS
using namespace simd;

// Sums of floats (or of their squared deviations from a float m) in double, in eight 4-wide accumulators so that the
// adds of 32 floats in flight do not wait on each other.
struct DoubleSum {
  __m256d acc[8];
  DIFFLORA_AVX2 DoubleSum() { for (__m256d& a : acc) a = _mm256_setzero_pd(); }
  template <bool Square>
  DIFFLORA_AVX2 void Add(int i, __m256 v) {  // i ∈ [0, 4): which pair of accumulators
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    acc[2 * i] = Square ? _mm256_fmadd_pd(lo, lo, acc[2 * i]) : _mm256_add_pd(acc[2 * i], lo);
    acc[2 * i + 1] = Square ? _mm256_fmadd_pd(hi, hi, acc[2 * i + 1]) : _mm256_add_pd(acc[2 * i + 1], hi);
  }
  DIFFLORA_AVX2 double Total() const {
    __m256d s = acc[0];
    for (int i = 1; i < 8; ++i) s = _mm256_add_pd(s, acc[i]);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
};

template <bool Square>
DIFFLORA_AVX2 inline __m256 Term(__m256 v, __m256 m) { return Square ? _mm256_sub_ps(v, m) : v; }

// Σ x (Square false) or Σ (x − m)² (Square true) over n contiguous floats, in double.
template <bool Square>
DIFFLORA_AVX2 double SumOf(const float* x, int64_t n, __m256 m) {
  DoubleSum sum;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    for (int i = 0; i < 4; ++i) sum.Add<Square>(i, Term<Square>(_mm256_loadu_ps(x + j + 8 * i), m));
  }
  for (; j + 8 <= n; j += 8) sum.Add<Square>(0, Term<Square>(_mm256_loadu_ps(x + j), m));
  if (j < n) {  // the tail: masked lanes load 0 and are zeroed after the subtraction
    const __m256i mask = FirstLanes(static_cast<int>(n - j));
    sum.Add<Square>(1, _mm256_and_ps(_mm256_castsi256_ps(mask), Term<Square>(_mm256_maskload_ps(x + j, mask), m)));
  }
  return sum.Total();
}

struct Moments {
  float meanHi, meanLo, rstd;  // the mean as a float and the float nearest the rest
};

// Mean and 1/sqrt(variance + eps) of n contiguous floats (the biased variance, as group_norm's): the mean, then the
// mean squared deviation from it, where one pass of E[x²] − mean² would cancel.
DIFFLORA_AVX2 Moments GroupMoments(const float* x, int64_t n, double eps) {
  const double mean = SumOf<false>(x, n, _mm256_setzero_ps()) / static_cast<double>(n);
  const float hi = static_cast<float>(mean);
  const double variance = SumOf<true>(x, n, _mm256_set1_ps(hi)) / static_cast<double>(n);
  return {hi, static_cast<float>(mean - hi), static_cast<float>(1.0 / std::sqrt(variance + eps))};
}

// silu(((x − meanHi) − meanLo)·a + b): x − meanHi is exact where x is near the mean, so a mean far from 0 (a group
// of values around 100 with a spread of 1, say) costs no precision, as it would in x·a + (b − mean·a).
DIFFLORA_AVX2 inline __m256 AffineSilu(__m256 x, __m256 meanHi, __m256 meanLo, __m256 a, __m256 b) {
  const __m256 y = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_sub_ps(x, meanHi), meanLo), a, b);
  const __m256 negative = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 minusAbs = _mm256_or_ps(y, _mm256_set1_ps(-0.f));  // −|y|
  const __m256 t = ExpNonPositive(minusAbs);                        // e^−|y| ∈ (0, 1]
  // σ(y) = 1 / (1 + e^−y) for y ≥ 0, e^y / (1 + e^y) for y < 0: both from t without overflow
  const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(_mm256_set1_ps(1.f), t, negative), _mm256_add_ps(_mm256_set1_ps(1.f), t));
  return _mm256_mul_ps(y, sigmoid);
}

// One channel of a group: n contiguous floats, scaled by a = rstd·γ and shifted by β.
DIFFLORA_AVX2 void ChannelSilu(const float* x, float* out, int64_t n, const Moments& m, float a, float b) {
  const int64_t full = n & ~int64_t{7};
  const int tail = static_cast<int>(n - full);
  const __m256 hi = _mm256_set1_ps(m.meanHi), lo = _mm256_set1_ps(m.meanLo), va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(out + j, AffineSilu(_mm256_loadu_ps(x + j), hi, lo, va, vb));
  if (tail) {
    const __m256i mask = FirstLanes(tail);
    _mm256_maskstore_ps(out + full, mask, AffineSilu(_mm256_maskload_ps(x + full, mask), hi, lo, va, vb));
  }
}

// The (batch item, group) pairs are shared among libtorch's intra-op threads, as ATen's group_norm does.
void GroupNormSiluKernel(const float* x, float* out, int64_t batch, int64_t channels, int64_t spatial, int64_t groups, const float* gamma,
                         const float* beta, double eps) {
  const int64_t perGroup = channels / groups;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, perGroup * spatial));
  at::parallel_for(0, batch * groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / groups, first = (i % groups) * perGroup;
      const Moments m = GroupMoments(x + (n * channels + first) * spatial, perGroup * spatial, eps);
      for (int64_t c = first; c < first + perGroup; ++c) {
        const float a = m.rstd * (gamma ? gamma[c] : 1.f);
        ChannelSilu(x + (n * channels + c) * spatial, out + (n * channels + c) * spatial, spatial, m, a, beta ? beta[c] : 0.f);
      }
    }
  });
}
#endif

bool Fast(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
#ifdef DIFFLORA_HAS_AVX2_KERNELS
  const auto fits = [&](const c10::optional<at::Tensor>& t) {
    return !t.has_value() || !t->defined() || (t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == x.size(1));
  };
  return HasAvx2() && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() > 0 && fits(weight) && fits(bias);
#else
  return false;
#endif
}

at::Tensor GroupNormSiluOp(const at::Tensor& x, int64_t groups, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                           double eps) {
  TORCH_CHECK(x.dim() >= 2 && groups > 0 && x.size(1) % groups == 0, "group_norm_silu: x must be [N, C, ...] with C a multiple of groups = ", groups,
              ", got ", x.sizes());
  const auto grad = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  // where a gradient is needed (a training UNet, a checkpointed block's replay in backward) autograd records the pair
  if (at::GradMode::is_enabled() && (x.requires_grad() || grad(weight) || grad(bias))) return at::silu(at::group_norm(x, groups, weight, bias, eps));
  if (!Fast(x, weight, bias)) {
    at::Tensor y = at::group_norm(x, groups, weight, bias, eps);
    return at::silu_(y);
  }
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
#ifdef DIFFLORA_HAS_AVX2_KERNELS
  const auto data = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr; };
  GroupNormSiluKernel(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), groups, data(weight),
                      data(bias), eps);
#endif
  return out;
}

}  // namespace
}  // namespace difflora

TORCH_LIBRARY_FRAGMENT(difflora, m) {
  m.def("group_norm_silu(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps) -> Tensor", &difflora::GroupNormSiluOp);
}
