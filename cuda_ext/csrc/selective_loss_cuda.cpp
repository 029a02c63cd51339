// ATen/pybind11 binding of rho's fused selective-loss CUDA kernels (selective_loss_cuda_kernels.cu).
// Validates inputs, allocates outputs and enqueues the launchers on the current CUDA stream of the
// inputs' device. Nothing here synchronises with the host.
#include <torch/extension.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS / cuSPARSE /
// cuSOLVER headers, which an nvcc-only CUDA install lacks; the glue needs only the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "selective_loss_cuda_kernels.h"

namespace {

void check_cuda_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n,
                  const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// logits: [T, V], float32 / bfloat16 / float16, last dim contiguous, rows may be padded (stride >= V).
void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [tokens, vocab_local], got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "logits must be float32, bfloat16 or float16, got ", dt);
  const int64_t T = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V <= std::numeric_limits<int32_t>::max(), "vocab_local too large: ", V);
  TORCH_CHECK(V <= 1 || logits.stride(1) == 1, "logits' last dim must be contiguous");
  TORCH_CHECK(T <= 1 || logits.stride(0) >= V, "logits' rows must not overlap (stride(0) >= ", V,
              "), got stride ", logits.stride(0));
}

// Calls fn(ptr) with the logits' data pointer cast to the matching CUDA element type.
template <typename Fn>
void dispatch_logits(const at::Tensor& logits, Fn&& fn) {
  switch (logits.scalar_type()) {
    case at::kFloat: fn(static_cast<float*>(logits.data_ptr())); break;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(logits.data_ptr())); break;
    case at::kHalf: fn(static_cast<__half*>(logits.data_ptr())); break;
    default: TORCH_CHECK(false, "unsupported logits dtype ", logits.scalar_type());
  }
}

}  // namespace

// logits [T, V], targets [T] int64 (global ids) -> (lse_local [T] fp32, target_logit_local [T] fp32)
std::tuple<at::Tensor, at::Tensor> row_stats(const at::Tensor& logits, const at::Tensor& targets,
                                             int64_t vocab_start) {
  check_logits(logits);
  const int64_t T = logits.size(0), V = logits.size(1);
  check_vector(targets, "targets", at::kLong, T, logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({T}, fopts), target_logit = at::empty({T}, fopts);
  if (T == 0) return {lse, target_logit};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits, [&](auto* z) {
    check_cuda_error(rho_cuda::launch_row_stats(z, T, V, logits.stride(0),
                                                targets.data_ptr<int64_t>(), vocab_start,
                                                lse.data_ptr<float>(),
                                                target_logit.data_ptr<float>(), stream),
                     "row_stats kernel launch");
  });
  return {lse, target_logit};
}

// grad [T, V] (logits' dtype) = (exp(logits - lse) - onehot(targets - vocab_start)) * grad_loss,
// lse / grad_loss: [T] fp32 (lse = global logsumexp). inplace: written into logits and returned.
at::Tensor grad_logits(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                       const at::Tensor& lse, const at::Tensor& grad_loss, bool inplace) {
  check_logits(logits);
  const int64_t T = logits.size(0), V = logits.size(1);
  check_vector(targets, "targets", at::kLong, T, logits.device());
  check_vector(lse, "lse", at::kFloat, T, logits.device());
  check_vector(grad_loss, "grad_loss", at::kFloat, T, logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = inplace ? logits : at::empty({T, V}, logits.options());  // contiguous
  if (T == 0 || V == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(logits, [&](auto* z) {
    using T_ = std::remove_pointer_t<decltype(z)>;
    check_cuda_error(rho_cuda::launch_grad_logits(
                         static_cast<const T_*>(z), logits.stride(0),
                         static_cast<T_*>(grad.data_ptr()), grad.stride(0), T, V,
                         targets.data_ptr<int64_t>(), vocab_start, lse.data_ptr<float>(),
                         grad_loss.data_ptr<float>(), stream),
                     "grad_logits kernel launch");
  });
  return grad;
}

// excess [T] fp32, candidate [T] bool -> kept [T] bool: per segment of segment_len tokens, the
// floor(ratio * n_candidates + 0.5) candidates with the largest excess (ties: lower index wins).
at::Tensor topk_mask(const at::Tensor& excess, const at::Tensor& candidate, double ratio,
                     int64_t segment_len) {
  TORCH_CHECK(excess.is_cuda(), "excess must be a CUDA tensor");
  TORCH_CHECK(excess.dim() == 1, "excess must be 1-D [tokens], got ", excess.sizes());
  const int64_t T = excess.size(0);
  check_vector(excess, "excess", at::kFloat, T, excess.device());
  check_vector(candidate, "candidate", at::kBool, T, excess.device());
  TORCH_CHECK(ratio >= 0.0 && ratio <= 1.0, "ratio must be in [0, 1], got ", ratio);
  TORCH_CHECK(segment_len > 0, "segment_len must be > 0, got ", segment_len);
  TORCH_CHECK(segment_len <= std::numeric_limits<uint32_t>::max(),
              "segment_len must be < 2^32, got ", segment_len);
  TORCH_CHECK(T % segment_len == 0, "tokens (", T, ") must be a multiple of segment_len (",
              segment_len, ")");
  TORCH_CHECK(T / segment_len <= std::numeric_limits<int32_t>::max(), "too many segments");
  const c10::cuda::CUDAGuard guard(excess.device());
  at::Tensor kept = at::empty({T}, candidate.options());
  if (T == 0) return kept;
  check_cuda_error(rho_cuda::launch_topk_mask(excess.data_ptr<float>(), candidate.data_ptr<bool>(),
                                              kept.data_ptr<bool>(), T, segment_len, ratio,
                                              c10::cuda::getCurrentCUDAStream()),
                   "topk_mask kernel launch");
  return kept;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rho fused selective-loss CUDA kernels";
  m.def("row_stats", &row_stats, "per-row local logsumexp and target logit (fp32)",
        py::arg("logits"), py::arg("targets"), py::arg("vocab_start"));
  m.def("grad_logits", &grad_logits, "(softmax - onehot) * grad_loss in the logits' dtype",
        py::arg("logits"), py::arg("targets"), py::arg("vocab_start"), py::arg("lse"),
        py::arg("grad_loss"), py::arg("inplace"));
  m.def("topk_mask", &topk_mask, "per-segment top-k mask over candidate tokens",
        py::arg("excess"), py::arg("candidate"), py::arg("ratio"), py::arg("segment_len"));
}
