// Memory-efficient attention as a dispatcher operator, difflora::chunked_attention, for libtorch builds
// without a fused scaled-dot-product kernel (Debian's 1.13). The queries are processed in chunks, and
// autograd saves only q, k, v, the output and each row's log-sum-exp: backward recomputes one chunk's
// probabilities at a time (the scheme of xformers' and FlashAttention's backward). Memory per attention is
// O(chunk·Lk) in forward and backward instead of O(Lq·Lk).
//
// Being an operator (not JS code), it is recorded and replayed as one step by gradient checkpointing, so a
// replayed block keeps the same small footprint.
#include "common.h"
#include "softmax.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <dlfcn.h>

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

// ---- difflora::heads_attention: softmax(scale · q kᵀ) v per head, on the projections' own layout.
//
// q [B, Lq, H·D], k [B, Lk, H·D], v [B, Lk, H·Dv] → [B, Lq, H·Dv]: what diffusers' AttnProcessor computes between
// the projections (head_to_batch_dim, baddbmm(alpha=scale), softmax, bmm, batch_to_head_dim), and autograd's
// backward of it, with the same BLAS sgemm per head and native/softmax.cc's softmax and softmax backward (ATen's on
// a CPU without AVX2). On the CPU in float32 the heads
// are read and written in place through the GEMMs' leading dimensions, so the four head reshapes (copies) and
// their gradients' copies disappear, the scale rides on the GEMM's alpha (no pass over the scores), and the
// per-head GEMMs run in one loop instead of bmm's per-matrix select/addmm dispatch. Elsewhere (other dtypes,
// devices, or no BLAS sgemm found) it is that same composition in ATen ops.

// BLAS sgemm (Fortran, column-major), the one libtorch's CPU matmuls call; found at run time in the BLAS library
// libtorch loaded, so no link-time BLAS dependency (a libtorch without a separate BLAS takes the ATen path).
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
                         const float*, const int*, const float*, float*, const int*);

SgemmFn FindSgemm() {
  static const SgemmFn fn = []() -> SgemmFn {
    for (const char* lib : {"libblas.so.3", "libopenblas.so.0", "libopenblas.so", "libblas.so"}) {
      if (void* h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)) {
        if (void* sym = dlsym(h, "sgemm_")) return reinterpret_cast<SgemmFn>(sym);
      }
    }
    return reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  }();
  return fn;
}

// Row-major C[M×N] = alpha · op(A) · op(B) + beta · C, row strides lda/ldb/ldc: column-major sgemm of Cᵀ = op(B)ᵀ op(A)ᵀ.
void Gemm(SgemmFn f, bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = transB ? 'T' : 'N', tb = transA ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  f(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

// One head's matrix of a [B, L, H·D] tensor (row stride stride(1)) or of a contiguous [B·H, L, L'] one.
struct HeadView {
  const float* base;
  int64_t batchStride, headOffset, rowStride;
  const float* at(int64_t b, int64_t h) const { return base + b * batchStride + h * headOffset; }
};
HeadView Heads(const at::Tensor& t, int64_t d) { return {t.data_ptr<float>(), t.stride(0), d, t.stride(1)}; }

// t itself when the GEMMs can read its rows (unit stride inside a row, row stride ≥ the row), else a fresh row-major
// copy (contiguous() may keep odd strides on size-1 dims, which BLAS rejects as leading dimensions).
at::Tensor GemmReady(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(2)) && t.stride(1) <= INT32_MAX;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Heads are processed in groups whose scores take at most this many bytes, so that a group's scores, probabilities
// and their gradients stay in the core's cache between the GEMMs and softmax that use them: only the probabilities
// (kept for backward, as autograd keeps them for the composition) travel to and from memory.
constexpr int64_t kGroupBytes = 512 * 1024;

int64_t HeadsPerGroup(int64_t bh, int64_t lq, int64_t lk) {
  return std::max<int64_t>(1, std::min<int64_t>(bh, kGroupBytes / (lq * lk * static_cast<int64_t>(sizeof(float)))));
}

struct HeadsAttention : torch::autograd::Function<HeadsAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, double scale) {
    const SgemmFn f = FindSgemm();
    const int64_t B = q.size(0), lq = q.size(1), lk = k.size(1), d = q.size(2) / heads, dv = v.size(2) / heads, bh = B * heads, ss = lq * lk;
    const HeadView Q = Heads(q, d), K = Heads(k, d), V = Heads(v, dv);
    const int64_t group = HeadsPerGroup(bh, lq, lk);
    at::Tensor probs = at::empty({bh, lq, lk}, q.options());
    at::Tensor scores = at::empty({group, lq, lk}, q.options());
    at::Tensor out = at::empty({B, lq, heads * dv}, q.options());
    float* s = scores.data_ptr<float>();
    const float* p = probs.data_ptr<float>();
    float* o = out.data_ptr<float>();
    for (int64_t g0 = 0; g0 < bh; g0 += group) {
      const int64_t n = std::min(group, bh - g0);
      for (int64_t i = g0; i < g0 + n; ++i) {  // scale · q kᵀ
        const int64_t b = i / heads, h = i % heads;
        Gemm(f, false, true, lq, lk, d, static_cast<float>(scale), Q.at(b, h), Q.rowStride, K.at(b, h), K.rowStride, 0.f, s + (i - g0) * ss, lk);
      }
      if (!SoftmaxRows(s, probs.data_ptr<float>() + g0 * ss, n * lq, lk)) {
        at::Tensor pg = probs.narrow(0, g0, n);
        at::_softmax_out(pg, scores.narrow(0, 0, n), -1, false);
      }
      for (int64_t i = g0; i < g0 + n; ++i) {  // P v
        const int64_t b = i / heads, h = i % heads;
        Gemm(f, false, false, lq, dv, lk, 1.f, p + i * ss, lk, V.at(b, h), V.rowStride, 0.f, o + b * lq * heads * dv + h * dv, heads * dv);
      }
    }
    ctx->save_for_backward({q, k, v, probs});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gradOutputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &probs = saved[3];
    const int64_t heads = ctx->saved_data["heads"].toInt();
    const float scale = static_cast<float>(ctx->saved_data["scale"].toDouble());
    const SgemmFn f = FindSgemm();
    const at::Tensor dout = GemmReady(gradOutputs[0]);
    const int64_t B = q.size(0), lq = q.size(1), lk = k.size(1), d = q.size(2) / heads, dv = v.size(2) / heads, bh = B * heads, ss = lq * lk;
    const HeadView Q = Heads(q, d), K = Heads(k, d), V = Heads(v, dv), G = Heads(dout, dv);
    const float* p = probs.data_ptr<float>();
    const bool needQ = ctx->needs_input_grad(0), needK = ctx->needs_input_grad(1), needV = ctx->needs_input_grad(2);
    at::Tensor dq = needQ ? at::empty({B, lq, heads * d}, q.options()) : at::Tensor();
    at::Tensor dk = needK ? at::empty({B, lk, heads * d}, k.options()) : at::Tensor();
    at::Tensor dvt = needV ? at::empty({B, lk, heads * dv}, v.options()) : at::Tensor();
    const int64_t group = HeadsPerGroup(bh, lq, lk);
    at::Tensor dp, ds;
    if (needQ || needK) {
      dp = at::empty({group, lq, lk}, q.options());
      ds = at::empty({group, lq, lk}, q.options());
    }
    for (int64_t g0 = 0; g0 < bh; g0 += group) {
      const int64_t n = std::min(group, bh - g0);
      if (needV) {  // dV = Pᵀ dO
        float* o = dvt.data_ptr<float>();
        for (int64_t i = g0; i < g0 + n; ++i) {
          const int64_t b = i / heads, h = i % heads;
          Gemm(f, true, false, lk, dv, lq, 1.f, p + i * ss, lk, G.at(b, h), G.rowStride, 0.f, o + b * lk * heads * dv + h * dv, heads * dv);
        }
      }
      if (!needQ && !needK) continue;
      // dP = dO Vᵀ, then softmax's backward dS = P ⊙ (dP − Σ dP ⊙ P); the scale rides on the next GEMMs' alpha
      float* dps = dp.data_ptr<float>();
      for (int64_t i = g0; i < g0 + n; ++i) {
        const int64_t b = i / heads, h = i % heads;
        Gemm(f, false, true, lq, lk, dv, 1.f, G.at(b, h), G.rowStride, V.at(b, h), V.rowStride, 0.f, dps + (i - g0) * ss, lk);
      }
      if (!SoftmaxBackwardRows(dps, p + g0 * ss, ds.data_ptr<float>(), n * lq, lk)) {
        at::Tensor dsg = ds.narrow(0, 0, n);
        at::_softmax_backward_data_out(dsg, dp.narrow(0, 0, n), probs.narrow(0, g0, n), -1, probs.scalar_type());
      }
      const float* dss = ds.data_ptr<float>();
      for (int64_t i = g0; i < g0 + n; ++i) {
        const int64_t b = i / heads, h = i % heads;
        if (needQ)  // dQ = scale · dS K
          Gemm(f, false, false, lq, d, lk, scale, dss + (i - g0) * ss, lk, K.at(b, h), K.rowStride, 0.f, dq.data_ptr<float>() + b * lq * heads * d + h * d, heads * d);
        if (needK)  // dK = scale · dSᵀ Q
          Gemm(f, true, false, lk, d, lq, scale, dss + (i - g0) * ss, lk, Q.at(b, h), Q.rowStride, 0.f, dk.data_ptr<float>() + b * lk * heads * d + h * d, heads * d);
      }
    }
    return {dq, dk, dvt, at::Tensor(), at::Tensor()};
  }
};

// The composition the fast path replaces, in ATen ops (autograd records them): AttnProcessor's arithmetic.
at::Tensor HeadsAttentionComposite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, double scale) {
  const int64_t B = q.size(0), lq = q.size(1), dv = v.size(2) / heads;
  const auto split = [&](const at::Tensor& t) { return t.reshape({B, t.size(1), heads, -1}).transpose(1, 2).reshape({B * heads, t.size(1), -1}); };
  const at::Tensor probs = at::_softmax(at::bmm(split(q), split(k).transpose(1, 2)).mul_(scale), -1, false);
  return at::bmm(probs, split(v)).reshape({B, heads, lq, dv}).transpose(1, 2).reshape({B, lq, heads * dv});
}

at::Tensor HeadsAttentionOp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "heads_attention: q, k, v must be [B, L, heads·d], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(heads > 0 && q.size(2) % heads == 0 && k.size(2) == q.size(2) && v.size(2) % heads == 0,
              "heads_attention: the widths of q, k (equal) and v must be multiples of heads = ", heads, ", got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(1) == k.size(1),
              "heads_attention: q, k, v must share the batch and k, v their length, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const bool fast = FindSgemm() != nullptr && q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && q.numel() > 0 && k.numel() > 0 && v.numel() > 0 &&
                    std::max({q.size(1), k.size(1), q.size(2), v.size(2)}) <= INT32_MAX;
  if (!fast) return HeadsAttentionComposite(q, k, v, heads, scale);
  return HeadsAttention::apply(GemmReady(q), GemmReady(k), GemmReady(v), heads, scale);
}

}  // namespace
}  // namespace difflora

TORCH_LIBRARY(difflora, m) {
  m.def("chunked_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int chunk) -> Tensor", &difflora::ChunkedAttentionOp);
  m.def("heads_attention(Tensor q, Tensor k, Tensor v, int heads, float scale) -> Tensor", &difflora::HeadsAttentionOp);
}
