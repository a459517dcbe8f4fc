// taillor._C: declarations shared by the host bindings (bindings.cpp) and the CUDA implementation
// (randomized_svd.cu). Kept free of CUDA headers so bindings.cpp compiles with the host compiler alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace taillor {

// Batched randomized SVD of a contiguous CUDA tensor A (b, m, n) in float32/float16/bfloat16.
// Returns U (b, m, k), S (b, k) descending, V (b, n, k), all float32, with A[i] ~ U[i] diag(S[i]) V[i]^T.
// tf32: the range finder's products with A (sketch and power iterations) on TF32 tensor cores; false: float32.
// Arguments are validated by the caller (bindings.cpp); see randomized_svd.cu for the algorithm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cuda(
    const at::Tensor& A, int64_t k, int64_t niter, int64_t oversample, int64_t seed, bool tf32);

}  // namespace taillor
