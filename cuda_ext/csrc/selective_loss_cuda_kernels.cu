// CUDA kernels for rho's fused selective loss (Rho-1 selective language modeling).
//
//   row_stats_kernel   one pass over each logits row: local logsumexp (online max + rescaled sum,
//                      fp32) and the target's logit if the target column lives on this TP shard.
//   grad_logits_kernel one read + one write per element: (softmax - onehot) * grad_loss.
//   topk_mask_kernel   one block per segment: radix select of the k largest (excess, -index) keys.
//
// Pure CUDA (no ATen) so it builds standalone with nvcc; ATen glue is in selective_loss_cuda.cpp.
// Only explicit conversion intrinsics are used, so it also builds under torch's
// -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ flags.
#include "selective_loss_cuda_kernels.h"

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace rho_cuda {
namespace {

constexpr int kRowBlock = 256;         // threads per logits row (row_stats, grad_logits)
constexpr int kTopkBlock = 512;        // threads per top-k segment
constexpr int64_t kMaxGrid = 65535;    // row kernels grid-stride over rows beyond this

// ---- dtype helpers ---------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// 16 bytes of T: one 128-bit load/store (4 floats or 8 halves/bfloat16s).
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Elements before the first 16-byte-aligned address of `p` (clamped to `n`). Rows need not be
// aligned (row stride may be odd, the tensor may be an offset view), so each row is split into a
// scalar head, a vectorised body and a scalar tail. `p` is always aligned to sizeof(T).
template <typename T>
__device__ __forceinline__ int aligned_head(const T* p, int n) {
  const int h = static_cast<int>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T));
  return h < n ? h : n;
}

// ---- online logsumexp state ------------------------------------------------------------------
// (m, s) stands for sum = s * exp(m): m = running max, s = sum of exp(x - m). exp(a - b) with
// a == b is taken as 1 so that +-inf maxima never produce inf - inf = NaN; a NaN input
// poisons s (fmaxf drops NaN from m), so lse is NaN exactly like torch.logsumexp.

__device__ __forceinline__ float rel_exp(float a, float b) { return a == b ? 1.f : __expf(a - b); }

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  s = s * rel_exp(m, mn) + s2 * rel_exp(m2, mn);
  m = mn;
}

__device__ __forceinline__ void lse_warp_reduce(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
}

// ---- row_stats -------------------------------------------------------------------------------
// logits: [rows, V] (row stride `stride`), targets: [rows] -> lse, target_logit: [rows] fp32.
// One block per row (grid-stride over rows); each thread folds its strided elements into an (m, s)
// pair, then warp shuffles + a 32-entry shared array combine them.
template <typename T>
__global__ void __launch_bounds__(kRowBlock)
row_stats_kernel(const T* __restrict__ logits, int64_t rows, int V, int64_t stride,
                 const int64_t* __restrict__ targets, int64_t vocab_start,
                 float* __restrict__ lse, float* __restrict__ target_logit) {
  constexpr int N = Pack<T>::N;
  __shared__ float sm_m[kRowBlock / 32], sm_s[kRowBlock / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* z = logits + row * stride;
    const int head = aligned_head(z, V);
    const int nvec = (V - head) / N;
    const int tail = head + nvec * N;

    float m = -INFINITY, s = 0.f;
    for (int j = tid; j < head; j += kRowBlock) lse_merge(m, s, to_f(z[j]), 1.f);
    for (int j = tail + tid; j < V; j += kRowBlock) lse_merge(m, s, to_f(z[j]), 1.f);
    const Pack<T>* zv = reinterpret_cast<const Pack<T>*>(z + head);
    for (int v = tid; v < nvec; v += kRowBlock) {
      const Pack<T> p = zv[v];  // 128-bit load
      float x[N], vmax = -INFINITY;
#pragma unroll
      for (int k = 0; k < N; ++k) { x[k] = to_f(p.v[k]); vmax = fmaxf(vmax, x[k]); }
      const float mn = fmaxf(m, vmax);  // one rescale per 16 bytes, not per element
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < N; ++k) acc += rel_exp(x[k], mn);
      s = s * rel_exp(m, mn) + acc;
      m = mn;
    }

    lse_warp_reduce(m, s);
    if (lane == 0) { sm_m[warp] = m; sm_s[warp] = s; }
    __syncthreads();
    if (warp == 0) {
      m = lane < kRowBlock / 32 ? sm_m[lane] : -INFINITY;
      s = lane < kRowBlock / 32 ? sm_s[lane] : 0.f;
      lse_warp_reduce(m, s);
      if (lane == 0) {
        lse[row] = m + logf(s);  // m finite => s >= 1; m = -inf => -inf; NaN input => NaN
        const int64_t t = targets[row] - vocab_start;  // local column of the target, if any
        target_logit[row] = (uint64_t)t < (uint64_t)V ? to_f(z[t]) : 0.f;
      }
    }
    __syncthreads();  // sm_m / sm_s are reused by the next row
  }
}

// ---- grad_logits -----------------------------------------------------------------------------
// logits: [rows, V] (stride in_stride), grad: [rows, V] (stride out_stride; may equal logits),
// lse / grad_loss: [rows] fp32. No __restrict__ on logits/grad: they alias when in-place (each
// element is read and then written by the same thread, so that is safe).
template <typename T>
__global__ void __launch_bounds__(kRowBlock)
grad_logits_kernel(const T* logits, int64_t in_stride, T* grad, int64_t out_stride, int64_t rows,
                   int V, const int64_t* __restrict__ targets, int64_t vocab_start,
                   const float* __restrict__ lse, const float* __restrict__ grad_loss) {
  constexpr int N = Pack<T>::N;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* z = logits + row * in_stride;
    T* out = grad + row * out_stride;
    const float g = grad_loss[row];  // block-uniform branch below
    int head = aligned_head(out, V);

    if (g == 0.f) {  // unselected token: write zeros, skip reading the row
      const T zero = from_f<T>(0.f);
      Pack<T> pz;
#pragma unroll
      for (int k = 0; k < N; ++k) pz.v[k] = zero;
      const int nvec = (V - head) / N, tail = head + nvec * N;
      for (int j = tid; j < head; j += kRowBlock) out[j] = zero;
      for (int j = tail + tid; j < V; j += kRowBlock) out[j] = zero;
      Pack<T>* ov = reinterpret_cast<Pack<T>*>(out + head);
      for (int v = tid; v < nvec; v += kRowBlock) ov[v] = pz;
      continue;
    }

    // Input and output rows must share their offset within 16 bytes to vectorise both sides
    // (always true in-place or when both are contiguous with V*sizeof(T) % 16 == 0).
    if (((reinterpret_cast<uintptr_t>(z) ^ reinterpret_cast<uintptr_t>(out)) & 15u) != 0) head = V;
    const int nvec = (V - head) / N, tail = head + nvec * N;
    const float l = lse[row];
    const int64_t t64 = targets[row] - vocab_start;
    const int t = (uint64_t)t64 < (uint64_t)V ? static_cast<int>(t64) : -1;  // local target column
    auto f = [&](float x, int j) {
      const float p = __expf(x - l);
      return (j == t ? p - 1.f : p) * g;
    };

    for (int j = tid; j < head; j += kRowBlock) out[j] = from_f<T>(f(to_f(z[j]), j));
    for (int j = tail + tid; j < V; j += kRowBlock) out[j] = from_f<T>(f(to_f(z[j]), j));
    const Pack<T>* zv = reinterpret_cast<const Pack<T>*>(z + head);
    Pack<T>* ov = reinterpret_cast<Pack<T>*>(out + head);
    for (int v = tid; v < nvec; v += kRowBlock) {
      const Pack<T> p = zv[v];
      Pack<T> q;
      const int j0 = head + v * N;
#pragma unroll
      for (int k = 0; k < N; ++k) q.v[k] = from_f<T>(f(to_f(p.v[k]), j0 + k));
      ov[v] = q;
    }
  }
}

// ---- topk_mask -------------------------------------------------------------------------------
// Order-preserving map float -> uint32 (larger float => larger key). NaN ranks as -inf and -0.0 as
// +0.0, so both tie with their counterpart and fall back to the index tie-break. Pure bit tests
// (no float compares), so --use_fast_math's flush-to-zero cannot merge denormals with 0.
__device__ __forceinline__ uint32_t float_key(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) u = 0xFF800000u;  // NaN -> -inf
  if ((u & 0x7FFFFFFFu) == 0u) u = 0u;                   // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// 64-bit key: (excess, then LOWER index) larger => preferred. Keys are unique within a segment.
__device__ __forceinline__ unsigned long long token_key(float x, uint32_t idx) {
  return ((unsigned long long)float_key(x) << 32) | (unsigned long long)(0xFFFFFFFFu - idx);
}

// excess, candidate, kept: [segments * seg_len]; block b handles segment b.
// 1) n = #candidates (barrier counts), k = floor(ratio*n + 0.5) in double, same in every thread.
// 2) If 0 < k < n: MSB-first radix select over 8-bit digits (<= 8 passes) for the k-th largest
//    candidate key. Each pass histograms the digit of the candidates whose higher digits equal the
//    prefix chosen so far, then warp 0 finds the digit d where the count of larger digits < k_rem
//    <= count of digits >= d, appends d to the prefix and subtracts the larger count from k_rem.
//    Once exactly k_rem candidates share the prefix (at the latest on the last pass, as keys are
//    unique), every key >= prefix (lower bits zero) is selected: exactly k of them.
// 3) kept[i] = candidate[i] && key(i) >= threshold (k == n: threshold 0; k == 0: nothing kept).
__global__ void __launch_bounds__(kTopkBlock)
topk_mask_kernel(const float* __restrict__ excess, const bool* __restrict__ candidate,
                 bool* __restrict__ kept, int64_t seg_len, double ratio) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long s_prefix, s_krem;
  __shared__ int s_done;
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t base = (int64_t)blockIdx.x * seg_len;
  const float* ex = excess + base;
  const bool* cand = candidate + base;
  bool* out = kept + base;

  unsigned long long n = 0;
  for (int64_t b = 0; b < seg_len; b += kTopkBlock) {
    const int64_t i = b + tid;
    n += (unsigned long long)__syncthreads_count(i < seg_len && cand[i]);
  }
  // __dmul_rn/__dadd_rn: no FMA contraction, so k matches the double-precision host formula.
  const double kd = floor(__dadd_rn(__dmul_rn(ratio, (double)n), 0.5));
  const unsigned long long k =
      !(kd > 0.0) ? 0ull : (kd >= (double)n ? n : (unsigned long long)kd);

  unsigned long long threshold = 0;  // k == n: every candidate
  if (k > 0 && k < n) {
    if (tid == 0) { s_prefix = 0; s_krem = k; s_done = 0; }
    unsigned long long mask = 0;  // digits already fixed in s_prefix
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int d = tid; d < 256; d += kTopkBlock) hist[d] = 0;
      __syncthreads();
      const unsigned long long prefix = s_prefix;
      for (int64_t b = 0; b < seg_len; b += kTopkBlock) {  // uniform trip count: full-warp ops ok
        const int64_t i = b + tid;
        int digit = -1;
        if (i < seg_len && cand[i]) {
          const unsigned long long key = token_key(ex[i], (uint32_t)i);
          if ((key & mask) == prefix) digit = (int)((key >> shift) & 0xFF);
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
        // Warp-aggregated increment: keys often share their top digits (sign/exponent), and
        // 32 same-address shared atomics would serialise.
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (unsigned)__popc(peers));
#else
        if (digit >= 0) atomicAdd(&hist[digit], 1u);
#endif
      }
      __syncthreads();
      if (tid < 32) {
        // Lane l owns digits 255-8l .. 248-8l (descending); an inclusive warp scan over the lane
        // totals gives each lane the number of matching keys with a larger digit.
        const unsigned long long krem = s_krem;
        unsigned long long local = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) local += hist[255 - 8 * lane - j];
        unsigned long long incl = local;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += up;
        }
        unsigned long long cum = incl - local;  // matching keys in larger digits than this lane's
        if (cum < krem && krem <= incl) {       // exactly one lane holds the k_rem-th largest
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const unsigned int c = hist[255 - 8 * lane - j];
            if (cum + c >= krem) {
              const unsigned long long d = (unsigned long long)(255 - 8 * lane - j);
              const unsigned long long knew = krem - cum;
              s_prefix = prefix | (d << shift);
              s_krem = knew;
              s_done = (c == knew);  // all keys with this prefix are selected
              break;
            }
            cum += c;
          }
        }
      }
      __syncthreads();
      mask |= 0xFFull << shift;
      if (s_done) break;  // block-uniform (read after the barrier)
    }
    threshold = s_prefix;
  }

  const bool none = (k == 0);
  for (int64_t i = tid; i < seg_len; i += kTopkBlock)
    out[i] = !none && cand[i] && token_key(ex[i], (uint32_t)i) >= threshold;
}

inline unsigned row_grid(int64_t rows) { return (unsigned)(rows < kMaxGrid ? rows : kMaxGrid); }

}  // namespace

// ---- launchers -------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_row_stats(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                             const int64_t* targets, int64_t vocab_start, float* lse,
                             float* target_logit, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  row_stats_kernel<T><<<row_grid(rows), kRowBlock, 0, stream>>>(
      logits, rows, (int)vocab, row_stride, targets, vocab_start, lse, target_logit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_logits(const T* logits, int64_t in_stride, T* grad, int64_t out_stride,
                               int64_t rows, int64_t vocab, const int64_t* targets,
                               int64_t vocab_start, const float* lse, const float* grad_loss,
                               cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  grad_logits_kernel<T><<<row_grid(rows), kRowBlock, 0, stream>>>(
      logits, in_stride, grad, out_stride, rows, (int)vocab, targets, vocab_start, lse, grad_loss);
  return cudaGetLastError();
}

cudaError_t launch_topk_mask(const float* excess, const bool* candidate, bool* kept, int64_t tokens,
                             int64_t segment_len, double ratio, cudaStream_t stream) {
  if (tokens <= 0 || segment_len <= 0) return cudaSuccess;
  const int64_t segments = tokens / segment_len;
  topk_mask_kernel<<<(unsigned)segments, kTopkBlock, 0, stream>>>(excess, candidate, kept,
                                                                  segment_len, ratio);
  return cudaGetLastError();
}

#define RHO_INSTANTIATE(T)                                                                        \
  template cudaError_t launch_row_stats<T>(const T*, int64_t, int64_t, int64_t, const int64_t*,   \
                                           int64_t, float*, float*, cudaStream_t);                \
  template cudaError_t launch_grad_logits<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t,    \
                                             const int64_t*, int64_t, const float*, const float*, \
                                             cudaStream_t);
RHO_INSTANTIATE(float)
RHO_INSTANTIATE(__nv_bfloat16)
RHO_INSTANTIATE(__half)
#undef RHO_INSTANTIATE

}  // namespace rho_cuda
