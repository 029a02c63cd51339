// rho's fused selective-loss building blocks on the CPU (C++ / ATen, at::parallel_for over rows).
//
//   row_stats(logits, targets, vocab_start)            -> (lse_local, target_logit_local)   one read
//   grad_logits(logits, targets, vocab_start, lse, g,  -> grad (optionally in place)        one read,
//               inplace)                                                                    one write
//   topk_mask(excess, candidate, ratio, segment_len)   -> kept (bool)                       O(tokens)
//
// Semantics are cuda_ext/reference.py's; shapes: logits [tokens, vocab_local] (last dim contiguous),
// targets [tokens] int64 global ids, vocab_start = this TP rank's first id, lse/g/excess [tokens] fp32.
//
// exp() is a polynomial written so that GCC vectorises the loops (libm's expf does not vectorise
// without -ffast-math): Cody-Waite range reduction, degree-6 polynomial, 2^n by exponent bits;
// relative error < 2e-7 over the range softmax needs (x <= 0). All accumulation is in fp32.

// Only ATen and the op registry: registered as torch operators (torch.ops.rho_cpu.*), not a pybind11
// module, so the build skips torch/extension.h (its headers are ~25 s of the ~30 s a build took; now
// ~8 s on 2 cores: the first rho run on a machine, and every CI clone, waits that long).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 512;  // floats converted per block of a row: stays in L1

inline float fast_exp(float x) {
  // exp(x) for x in [-inf, 88]; returns 0 below -87.3 (where fp32 exp underflows anyway).
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  float xc = std::min(std::max(x, -87.3f), 88.3f);
  // round to nearest with the 1.5 * 2^23 trick: std::floor/rint block GCC's vectoriser here
  float n = (xc * kLog2e + 12582912.0f) - 12582912.0f;
  float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale = __builtin_bit_cast(float, bits);
  return x < -87.3f ? 0.0f : p * scale;
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename scalar_t>
inline void load_chunk(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
}

// logsumexp of a row holding a NaN or +inf, as torch.logsumexp (and the CUDA kernel) give it:
// NaN if any element is NaN, else +inf. Rare, so a plain scalar pass.
template <typename scalar_t>
float nonfinite_lse(const scalar_t* row, int64_t V) {
  for (int64_t j = 0; j < V; ++j)
    if (std::isnan(to_float(row[j]))) return std::numeric_limits<float>::quiet_NaN();
  return std::numeric_limits<float>::infinity();
}

template <typename scalar_t>
void row_stats_kernel(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                      at::Tensor& lse, at::Tensor& target_logit) {
  const int64_t T = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const scalar_t* z = logits.data_ptr<scalar_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  float* lse_out = lse.data_ptr<float>();
  float* tl_out = target_logit.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = z + i * stride;
      float m = -std::numeric_limits<float>::infinity();
      float s = 0.0f;
      int nonfinite = 0;  // a NaN or +inf seen: the vectorised max and exp would hide it
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        load_chunk(row + c, buf, n);
        float cm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cm) reduction(| : nonfinite)
        for (int64_t j = 0; j < n; ++j) {
          cm = std::max(cm, buf[j]);
          nonfinite |= !(buf[j] <= std::numeric_limits<float>::max());  // NaN or +inf
        }
        if (cm > m) {  // online rescale: the running sum was relative to the old max
          s = (m == -std::numeric_limits<float>::infinity()) ? 0.0f : s * fast_exp(m - cm);
          m = cm;
        }
        if (m == -std::numeric_limits<float>::infinity()) continue;
        float cs = 0.0f;
#pragma omp simd reduction(+ : cs)
        for (int64_t j = 0; j < n; ++j) cs += fast_exp(buf[j] - m);
        s += cs;
      }
      lse_out[i] = nonfinite ? nonfinite_lse(row, V)
                             : (s > 0.0f) ? m + std::log(s) : -std::numeric_limits<float>::infinity();
      const int64_t local = tgt[i] - vocab_start;
      tl_out[i] = (local >= 0 && local < V) ? to_float(row[local]) : 0.0f;
    }
  });
}

template <typename scalar_t>
void grad_kernel(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                 const at::Tensor& lse, const at::Tensor& grad_loss, at::Tensor& grad) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const int64_t in_stride = logits.stride(0), out_stride = grad.stride(0);
  const scalar_t* z = logits.data_ptr<scalar_t>();
  scalar_t* dz = grad.data_ptr<scalar_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* g_p = grad_loss.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = z + i * in_stride;
      scalar_t* out = dz + i * out_stride;
      const float g = g_p[i];
      if (g == 0.0f) {  // dropped or masked token: its gradient is exactly zero, nothing to read
        std::fill(out, out + V, static_cast<scalar_t>(0.0f));
        continue;
      }
      const float l = lse_p[i];
      const int64_t local = tgt[i] - vocab_start;  // target column in this shard, or outside [0, V)
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        load_chunk(row + c, buf, n);  // read the chunk before writing it: out may alias row
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) buf[j] = fast_exp(buf[j] - l) * g;
        if (local >= c && local < c + n) buf[local - c] -= g;  // softmax - onehot, in fp32
        for (int64_t j = 0; j < n; ++j) out[c + j] = static_cast<scalar_t>(buf[j]);
      }
    }
  });
}

void check_common(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu(), "rho cpu kernel: logits must be on the CPU");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "rho cpu kernel: logits must be float32, bfloat16 or float16");
  TORCH_CHECK(logits.dim() == 2, "rho cpu kernel: logits must be [tokens, vocab_local]");
  TORCH_CHECK(logits.stride(1) == 1, "rho cpu kernel: logits' last dimension must be contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "rho cpu kernel: targets must be [tokens]");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "rho cpu kernel: targets must be int64");
}

}  // namespace

std::vector<at::Tensor> row_stats(const at::Tensor& logits, const at::Tensor& targets_in, int64_t vocab_start) {
  check_common(logits, targets_in);
  auto targets = targets_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  auto lse = at::empty({logits.size(0)}, opts);
  auto tl = at::empty({logits.size(0)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rho_row_stats", [&] {
    row_stats_kernel<scalar_t>(logits, targets, vocab_start, lse, tl);
  });
  return {lse, tl};
}

at::Tensor grad_logits(const at::Tensor& logits, const at::Tensor& targets_in, int64_t vocab_start,
                       const at::Tensor& lse_in, const at::Tensor& grad_loss_in, bool inplace) {
  check_common(logits, targets_in);
  auto targets = targets_in.contiguous();
  auto lse = lse_in.to(at::kFloat).contiguous();
  auto grad_loss = grad_loss_in.to(at::kFloat).contiguous();
  TORCH_CHECK(lse.numel() == logits.size(0) && grad_loss.numel() == logits.size(0),
              "rho cpu kernel: lse and grad_loss must be [tokens]");
  at::Tensor grad = inplace ? logits : at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rho_grad_logits", [&] {
    grad_kernel<scalar_t>(logits, targets, vocab_start, lse, grad_loss, grad);
  });
  return grad;
}

at::Tensor topk_mask(const at::Tensor& excess_in, const at::Tensor& candidate_in, double ratio, int64_t segment_len) {
  auto excess = excess_in.to(at::kFloat).contiguous();
  auto candidate = candidate_in.to(at::kBool).contiguous();
  const int64_t T = excess.numel();
  TORCH_CHECK(candidate.numel() == T, "rho cpu kernel: candidate must be [tokens]");
  TORCH_CHECK(segment_len > 0 && T % segment_len == 0, "rho cpu kernel: tokens must be a multiple of segment_len");
  TORCH_CHECK(ratio >= 0.0 && ratio <= 1.0, "rho cpu kernel: ratio must be in [0, 1]");
  auto kept = at::zeros({T}, excess.options().dtype(at::kBool));
  const float* e = excess.data_ptr<float>();
  const bool* cand = candidate.data_ptr<bool>();
  bool* out = kept.data_ptr<bool>();
  const int64_t segments = T / segment_len;
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t base = s * segment_len;
      idx.clear();
      for (int64_t j = 0; j < segment_len; ++j)
        if (cand[base + j]) idx.push_back(base + j);
      const int64_t n = static_cast<int64_t>(idx.size());
      const int64_t k = std::min<int64_t>(n, static_cast<int64_t>(std::floor(ratio * static_cast<double>(n) + 0.5)));
      if (k <= 0) continue;
      // Order: larger excess first (NaN counts as -inf), then lower index: deterministic ties.
      auto key = [&](int64_t i) { float v = e[i]; return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; };
      auto before = [&](int64_t a, int64_t b) {
        const float ka = key(a), kb = key(b);
        return ka > kb || (ka == kb && a < b);
      };
      if (k == n) {  // everything is kept: no ordering needed
        for (int64_t j = 0; j < n; ++j) out[idx[j]] = true;
        continue;
      }
      std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), before);
      const int64_t kth = idx[k - 1];
      for (int64_t j = 0; j < n; ++j)
        if (!before(kth, idx[j])) out[idx[j]] = true;  // idx[j] == kth or idx[j] before kth
    }
  });
  return kept;
}

// schemas inferred from the C++ signatures; torch.ops.rho_cpu.<name>(...) from Python
TORCH_LIBRARY(rho_cpu, m) {
  m.def("row_stats", &row_stats);      // per-row local logsumexp and target logit: one read of the logits
  m.def("grad_logits", &grad_logits);  // (softmax - onehot) * grad_loss, optionally in place
  m.def("topk_mask", &topk_mask);      // per-segment top-k by excess with deterministic ties
}
