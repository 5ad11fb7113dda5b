// Row softmax of float32 scores for difflora::heads_attention on the CPU (native/softmax.cc).
#pragma once

#include <cstdint>

namespace difflora {

// out[r, :] = softmax(in[r, :]) for `rows` contiguous rows of `cols` floats (in and out may be the same buffer).
// Returns false, touching nothing, where this CPU lacks the instructions the kernel uses (AVX2 and FMA): the caller
// then takes ATen's softmax.
bool SoftmaxRows(const float* in, float* out, int64_t rows, int64_t cols);

}  // namespace difflora
