// Row softmax of float32 scores, and its backward, for difflora::heads_attention on the CPU (native/softmax.cc).
#pragma once

#include <cstdint>

namespace difflora {

// out[r, :] = softmax(in[r, :]) for `rows` contiguous rows of `cols` floats (in and out may be the same buffer).
// Returns false, touching nothing, where this CPU lacks the instructions the kernel uses (AVX2 and FMA): the caller
// then takes ATen's softmax.
bool SoftmaxRows(const float* in, float* out, int64_t rows, int64_t cols);

// Softmax's backward on the same rows: out = p ⊙ (g − Σ g ⊙ p) per row, from the probabilities p and the gradient g
// of the output (out may be g's buffer). False, touching nothing, without AVX2 and FMA.
bool SoftmaxBackwardRows(const float* grad, const float* probs, float* out, int64_t rows, int64_t cols);

}  // namespace difflora
