// Memory-efficient attention as a dispatcher operator, difflora::chunked_attention, for libtorch builds
// without a fused scaled-dot-product kernel (Debian's 1.13). The queries are processed in chunks, and
// autograd saves only q, k, v, the output and each row's log-sum-exp: backward recomputes one chunk's
// probabilities at a time (the scheme of xformers' and FlashAttention's backward). Memory per attention is
// O(chunk·Lk) in forward and backward instead of O(Lq·Lk).
//
// Being an operator (not JS code), it is recorded and replayed as one step by gradient checkpointing, so a
// replayed block keeps the same small footprint.
#include "common.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>

namespace difflora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The scores of queries [start, start + n): scale · q kᵀ, then the mask (additive, or boolean where false
// means masked out). A mask with a query dimension of 1 is broadcast over all queries.
at::Tensor ChunkScores(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& mask, double scale, int64_t start, int64_t n) {
  at::Tensor s = at::matmul(q.narrow(-2, start, n), kt).mul_(scale);
  if (!mask.defined()) return s;
  const at::Tensor m = mask.dim() >= 2 && mask.size(-2) > 1 ? mask.narrow(-2, start, n) : mask;
  if (m.scalar_type() == at::kBool) return s.masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
  return s.add_(m);
}

struct ChunkedAttention : torch::autograd::Function<ChunkedAttention> {
  // mask travels as an IValue: it never needs a gradient, and an undefined Tensor argument is not portable
  // across libtorch versions' autograd::Function.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::IValue& mask, double scale, int64_t chunk) {
    const at::Tensor m = mask.isTensor() ? mask.toTensor() : at::Tensor();
    const at::Tensor kt = k.transpose(-1, -2);
    const int64_t lq = q.size(-2);
    std::vector<at::Tensor> outs, lses;
    for (int64_t start = 0; start < lq; start += chunk) {
      const int64_t n = std::min(chunk, lq - start);
      at::Tensor s = ChunkScores(q, kt, m, scale, start, n);
      at::Tensor lse = at::logsumexp(s, -1, /*keepdim=*/true);
      outs.push_back(at::matmul(s.sub_(lse).exp_(), v));  // softmax without a second buffer
      lses.push_back(lse);
    }
    at::Tensor out = at::cat(outs, -2);
    ctx->save_for_backward({q, k, v, out, at::cat(lses, -2)});
    ctx->saved_data["mask"] = mask;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gradOutputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const c10::IValue mask = ctx->saved_data["mask"];
    const at::Tensor m = mask.isTensor() ? mask.toTensor() : at::Tensor();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const at::Tensor dout = gradOutputs[0];
    // D_i = Σ_j dout_ij · out_ij = Σ_j p_ij · dp_ij: the softmax backward's row term
    const at::Tensor rowTerm = (dout * out).sum(-1, /*keepdim=*/true);
    const at::Tensor kt = k.transpose(-1, -2);
    const at::Tensor vt = v.transpose(-1, -2);
    at::Tensor dq = at::empty_like(q);
    at::Tensor dk = at::zeros_like(k);
    at::Tensor dv = at::zeros_like(v);
    const int64_t lq = q.size(-2);
    for (int64_t start = 0; start < lq; start += chunk) {
      const int64_t n = std::min(chunk, lq - start);
      at::Tensor p = ChunkScores(q, kt, m, scale, start, n).sub_(lse.narrow(-2, start, n)).exp_();
      const at::Tensor doutChunk = dout.narrow(-2, start, n);
      dv.add_(at::matmul(p.transpose(-1, -2), doutChunk));
      // ds = p ⊙ (dp − D), dp = dout vᵀ
      at::Tensor ds = at::matmul(doutChunk, vt).sub_(rowTerm.narrow(-2, start, n)).mul_(p);
      dq.narrow(-2, start, n).copy_(at::matmul(ds, k).mul_(scale));
      dk.add_(at::matmul(ds.transpose(-1, -2), q.narrow(-2, start, n)).mul_(scale));
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor ChunkedAttentionOp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                              double scale, int64_t chunk) {
  TORCH_CHECK(chunk > 0, "chunked_attention: chunk must be positive, got ", chunk);
  TORCH_CHECK(q.dim() >= 2 && q.dim() == k.dim() && k.dim() == v.dim(), "chunked_attention: q, k, v need the same rank (≥ 2)");
  TORCH_CHECK(q.sizes().slice(0, q.dim() - 2) == k.sizes().slice(0, k.dim() - 2) && k.sizes().slice(0, k.dim() - 1) == v.sizes().slice(0, v.dim() - 1),
              "chunked_attention: q, k, v must share their leading dimensions and k, v their length, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  return ChunkedAttention::apply(q, k, v, mask.has_value() && mask->defined() ? c10::IValue(*mask) : c10::IValue(), scale, chunk);
}

}  // namespace
}  // namespace difflora

TORCH_LIBRARY(difflora, m) {
  m.def("chunked_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int chunk) -> Tensor", &difflora::ChunkedAttentionOp);
}
