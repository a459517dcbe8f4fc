// taillor._C host bindings: argument validation and the Python module. The numerical work lives in
// randomized_svd.cu; this file needs no CUDA headers, and importing the module needs no GPU.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "randomized_svd.h"

namespace taillor {
namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Checks that need no device work come first, so they behave the same for CPU and CUDA tensors.
void check_arguments(const at::Tensor& A, int64_t k, int64_t niter, int64_t oversample,
                     const std::string& precision) {
  TORCH_CHECK_VALUE(precision == "fp32" || precision == "tf32",
              "randomized_svd: precision must be \"fp32\" or \"tf32\", got \"", precision, "\"");
  TORCH_CHECK_VALUE(A.defined(), "randomized_svd: A is an undefined tensor");
  TORCH_CHECK_VALUE(A.dim() == 3, "randomized_svd: A must have 3 dims (b, m, n), got ", A.dim(),
              " dims with shape ", A.sizes());
  const auto t = A.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "randomized_svd: A must be torch.float32, torch.float16 or torch.bfloat16, got ",
              dtype_name(t));
  const int64_t m = A.size(1), n = A.size(2);
  TORCH_CHECK_VALUE(m >= 1 && n >= 1, "randomized_svd: A must have non-empty matrices, got shape ", A.sizes());
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(m <= kIntMax && n <= kIntMax && A.size(0) <= kIntMax,
              "randomized_svd: dims of A must fit in a 32-bit int (cuBLAS), got shape ", A.sizes());
  const int64_t mn = std::min(m, n);
  TORCH_CHECK_VALUE(k >= 1 && k <= mn, "randomized_svd: k must be in [1, min(m, n)] = [1, ", mn, "] for A of shape ",
              A.sizes(), ", got k=", k);
  TORCH_CHECK_VALUE(niter >= 0, "randomized_svd: niter must be >= 0, got niter=", niter);
  TORCH_CHECK_VALUE(oversample >= 0, "randomized_svd: oversample must be >= 0, got oversample=", oversample);
  TORCH_CHECK_VALUE(A.is_contiguous(), "randomized_svd: A must be contiguous, got shape ", A.sizes(), " with strides ",
              A.strides(), " (call .contiguous())");
  TORCH_CHECK_VALUE(A.is_cuda(), "randomized_svd: A must be a CUDA tensor, got device ", A.device(),
              " (use torch.linalg.svd or taillor.randomized_svd for other devices)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd(const at::Tensor& A, int64_t k, int64_t niter,
                                                              int64_t oversample, int64_t seed,
                                                              const std::string& precision) {
  check_arguments(A, k, niter, oversample, precision);
  // checks NaN/Inf on the device (see the .cu)
  return randomized_svd_cuda(A, k, niter, oversample, seed, precision == "tf32");
}

constexpr const char* kRandomizedSvdDoc = R"doc(randomized_svd(A, k, niter, oversample, seed, precision="fp32") -> (U, S, V)

Batched randomized SVD (Halko, Martinsson & Tropp 2011) on a CUDA device.

Args:
    A: contiguous CUDA tensor of shape (b, m, n), dtype float32, float16 or bfloat16 (a batch of
        same-shape matrices; half inputs are converted to float32 once).
    k: number of singular triplets to return, 1 <= k <= min(m, n).
    niter: number of power iterations (>= 0); 2 is a good default for decaying spectra.
    oversample: extra sketch columns (>= 0); the sketch has l = min(k + oversample, min(m, n)) columns.
    seed: seed of the Philox generator of the Gaussian sketch; the result is deterministic for a given
        seed, shape and device.
    precision: "fp32" (default: every product with A in float32, no TF32 whatever torch's global setting) or
        "tf32" (the sketch and the power iterations on TF32 tensor cores; the final projection A^T Q that sets
        the singular values and vectors stays float32).

Returns:
    U (b, m, k), S (b, k) in descending order, V (b, n, k), all float32, with
    A[i] ~= U[i] @ diag(S[i]) @ V[i].T. U and V have orthonormal columns, also where S is zero.

Raises:
    RuntimeError naming the offending value for a bad device, dtype, shape, k, niter or oversample,
    an unknown precision, or when A contains NaN or Inf.
)doc";

}  // namespace
}  // namespace taillor

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "taillor._C: optional CUDA extension of taillor (batched randomized SVD with cuBLAS/cuSOLVER).";
  m.def("randomized_svd", &taillor::randomized_svd, taillor::kRandomizedSvdDoc, pybind11::arg("A"),
        pybind11::arg("k"), pybind11::arg("niter"), pybind11::arg("oversample"), pybind11::arg("seed"),
        pybind11::arg("precision") = "fp32", pybind11::call_guard<pybind11::gil_scoped_release>());
}
