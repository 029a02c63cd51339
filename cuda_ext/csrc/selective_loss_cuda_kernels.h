// Launchers for rho's fused selective-loss CUDA kernels (see selective_loss_cuda_kernels.cu).
//
// Pure CUDA: raw device pointers, sizes and a stream; no ATen. Every launcher only enqueues work on
// `stream` (no host synchronisation) and returns cudaGetLastError() of the launch. Zero rows /
// tokens launch nothing. Logit dtypes: float, __nv_bfloat16, __half (explicitly instantiated).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace rho_cuda {

// Per-row local statistics of one tensor-parallel vocabulary shard.
//   logits:       [rows, vocab] with row stride `row_stride` elements (>= vocab), last dim contiguous
//   targets:      [rows] int64, GLOBAL vocabulary ids; this shard covers [vocab_start, vocab_start+vocab)
//   lse:          [rows] fp32 out, log(sum_j exp(logits[i, j])) over the local columns
//   target_logit: [rows] fp32 out, logits[i, targets[i]-vocab_start] if that column is local, else 0
template <typename T>
cudaError_t launch_row_stats(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                             const int64_t* targets, int64_t vocab_start, float* lse,
                             float* target_logit, cudaStream_t stream);

// Cross-entropy gradient w.r.t. the local logits:
//   grad[i, j] = (exp(logits[i, j] - lse[i]) - [j + vocab_start == targets[i]]) * grad_loss[i]
//   logits: [rows, vocab], row stride in_stride;  grad: [rows, vocab], row stride out_stride
//   (grad may alias logits exactly: in-place, same pointer and stride)
//   lse:    [rows] fp32, the GLOBAL logsumexp;   grad_loss: [rows] fp32 (rows with 0 are written as 0
//   without reading logits)
template <typename T>
cudaError_t launch_grad_logits(const T* logits, int64_t in_stride, T* grad, int64_t out_stride,
                               int64_t rows, int64_t vocab, const int64_t* targets,
                               int64_t vocab_start, const float* lse, const float* grad_loss,
                               cudaStream_t stream);

// Per-segment top-k token mask.
//   excess, candidate, kept: [tokens]; tokens % segment_len == 0; 0 < segment_len <= 2^32 - 1.
//   In each segment of segment_len consecutive tokens: n = #candidates, k = floor(ratio*n + 0.5)
//   (double), kept = the k candidates with the largest excess, ordered by (excess desc, index asc);
//   NaN excess ranks as -inf, -0.0 ties with +0.0.
cudaError_t launch_topk_mask(const float* excess, const bool* candidate, bool* kept, int64_t tokens,
                             int64_t segment_len, double ratio, cudaStream_t stream);

}  // namespace rho_cuda
