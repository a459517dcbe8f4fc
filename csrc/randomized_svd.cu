// taillor._C: batched randomized SVD on CUDA (cuBLAS GEMMs, cuSOLVER Cholesky, a cuRAND Philox sketch).
//
// Algorithm (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1), per matrix A (m x n) of the batch:
//
//   l     = min(k + oversample, min(m, n))            sketch width
//   Omega = Gaussian (n x l)                          Philox4x32-10, counter = element index, key = seed
//   Q     = orth1(A Omega)                            (m x l), range finder
//   repeat niter times:                               subspace (power) iteration
//       Z = orth1(A^T Q)                              (n x l)
//       Q = orth1(A Z)   (orth2 on the last iteration) (m x l)
//   Bt    = A^T Q                                     (n x l), B = Q^T A = Bt^T
//   G     = Bt^T Bt = Q^T A A^T Q                     (l x l), formed in float64
//   G     = E diag(lambda) E^T                        symmetric eigensolver (float64), lambda descending
//   sigma = sqrt(max(lambda, 0));  U = Q E;  V = orth(Bt E diag(1/sigma))      truncated to k columns
//
// Numerics.
// * A is converted to float32 once (half inputs included) and every product with A is a float32 cuBLAS
//   strided-batched GEMM with CUBLAS_COMPUTE_32F_PEDANTIC, so a global TF32 setting cannot degrade it.
//   precision "tf32" (opt-in) runs the range finder's products (A Omega and every power iteration) with
//   CUBLAS_COMPUTE_32F_FAST_TF32 on tensor cores; they only shape the subspace Q, which CholeskyQR keeps
//   orthonormal in float64. The Rayleigh-Ritz product Bt = A^T Q that sets sigma, U and V stays in float32.
// * orth() is CholeskyQR: G = X^T X, R = chol(G) (upper), X <- X R^{-1}. It is a few GEMMs and a batched
//   l x l Cholesky instead of a sequential Householder sweep over m rows, so it is fast for tall-skinny
//   batches. One pass (orth1) loses orthogonality like u * cond(X)^2 (u: unit roundoff of the float64 Gram,
//   Cholesky and solve): about 1e-6 at the flag threshold below, so the basis is well conditioned, which is all
//   a power step needs. The basis that is kept (the last one) gets a second pass (orth2, CholeskyQR2), which
//   sees cond ~ 1 and restores orthogonality to ~u. The eager oracle does the same; one pass instead of two on
//   every intermediate basis cuts the float64 work of the range finder from 2 + 4 niter to 2 + 2 niter passes.
// * The Gram, the Cholesky and the triangular solve run in float64: the float32 data are exact in float64,
//   so squaring the condition number is harmless for cond(X) up to ~1e7, where a float32 Gram would
//   already fail at cond(X) ~ 3e3. This matters because the sketch of a decaying spectrum, or of a
//   rank-deficient matrix, is ill-conditioned by construction.
// * Fallback: a matrix of the batch whose Cholesky fails (cuSOLVER info != 0, e.g. a zero or exactly
//   rank-deficient sketch) or whose Cholesky factor has max(diag R) / min(diag R) > kMaxDiagRatio = 1e5
//   (a lower bound of cond(X); the Gram is then too ill-conditioned to trust) in any pass of any orth()
//   of the range finder is flagged on the device; after the range finder, the flagged matrices redo it with
//   Householder QR (at::linalg_qr, column signs fixed so that diag(R) >= 0, like CholeskyQR) for every
//   orth(). Householder QR is unconditionally stable and returns orthonormal columns even for zero columns;
//   only the flagged matrices take this slower path.
// * The small SVD goes through the eigenproblem of G = B B^T in float64: sigma_i^2 is then resolved down
//   to ~1e-16 sigma_1^2, below the float32 noise floor of B itself (~1e-7 sigma_1). V = Bt E / sigma is
//   re-orthonormalized with the same orth(); columns whose sigma <= sigma_1 * eps32 * max(m, n) (noise or
//   exact zeros, always trailing since sigma is sorted) are zeroed before, so orth() completes them with
//   orthonormal directions (finite V even for a zero matrix) instead of amplifying noise by 1/sigma.
//
// Everything runs on the current CUDA stream: cuBLAS through torch's handle, cuSOLVER through a handle of
// our own (one per thread and device), ATen ops on the current stream.
//
// Host synchronisations: a constant number per call, none per power iteration. CholeskyQR flags the matrices it
// cannot trust on the device, and the flags of every orth() of the range finder are OR-ed together; the
// finiteness of A is checked on the device too, on the sketch A Omega (a NaN or Inf in A reaches it with
// probability 1: a pass over m x l numbers instead of m x n). One copy to the host after the range finder reads
// both: NaN/Inf raises ValueError; flagged matrices (rare: zero or exactly rank-deficient sketches) redo the range
// finder with Householder QR for every orth(), from the same sketch. The batched eigensolver reads its
// convergence flags (one more synchronisation), and the final orth() of V reads its flags once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <curand_kernel.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cfloat>
#include <limits>
#include <unordered_map>
#include <vector>

#include "randomized_svd.h"

namespace taillor {
namespace {

const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_ZERO_PIVOT: return "CUSOLVER_STATUS_ZERO_PIVOT";
    case CUSOLVER_STATUS_INVALID_LICENSE: return "CUSOLVER_STATUS_INVALID_LICENSE";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "CUSOLVER_STATUS_INVALID_WORKSPACE";
    default: return "CUSOLVER_STATUS_<unknown>";
  }
}

#define TAILLOR_CUDA_CHECK(expr)                                                                       \
  do {                                                                                                 \
    const cudaError_t taillor_err_ = (expr);                                                           \
    TORCH_CHECK(taillor_err_ == cudaSuccess, "randomized_svd: ", #expr, " failed with ",              \
                cudaGetErrorName(taillor_err_), ": ", cudaGetErrorString(taillor_err_));               \
  } while (0)

#define TAILLOR_CUBLAS_CHECK(expr)                                                                     \
  do {                                                                                                 \
    const cublasStatus_t taillor_st_ = (expr);                                                         \
    TORCH_CHECK(taillor_st_ == CUBLAS_STATUS_SUCCESS, "randomized_svd: ", #expr, " failed with ",     \
                cublasGetStatusName(taillor_st_));                                                     \
  } while (0)

#define TAILLOR_CUSOLVER_CHECK(expr)                                                                   \
  do {                                                                                                 \
    const cusolverStatus_t taillor_st_ = (expr);                                                       \
    TORCH_CHECK(taillor_st_ == CUSOLVER_STATUS_SUCCESS, "randomized_svd: ", #expr, " failed with ",   \
                cusolver_status_name(taillor_st_));                                                    \
  } while (0)

// Largest accepted max(diag R) / min(diag R) of a Cholesky factor before falling back to Householder QR.
// diag-ratio <= cond(X); CholeskyQR2 with a float64 Gram is safe well beyond this (cond(X) ~ 1e7).
constexpr double kMaxDiagRatio = 1e5;

// ---------------------------------------------------------------------------------------------------
// Gaussian sketch: element e of the flattened (b, n, l) tensor is component e % 4 of the Philox4x32-10
// draw with key `seed` and subsequence e / 4 (Box-Muller). It depends only on (seed, e): deterministic
// for a given seed and shape, independent of launch geometry.
// ---------------------------------------------------------------------------------------------------
__global__ void gaussian_philox_kernel(float* __restrict__ out, int64_t numel, unsigned long long seed) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t base = 4 * t;
  if (base >= numel) return;
  curandStatePhilox4_32_10_t state;
  curand_init(seed, static_cast<unsigned long long>(t), 0ULL, &state);
  const float4 g = curand_normal4(&state);
  out[base] = g.x;
  if (base + 1 < numel) out[base + 1] = g.y;
  if (base + 2 < numel) out[base + 2] = g.z;
  if (base + 3 < numel) out[base + 3] = g.w;
}

void fill_gaussian(at::Tensor& out, int64_t seed) {
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat && out.is_contiguous());
  const int64_t numel = out.numel();
  if (numel == 0) return;
  constexpr int kThreads = 256;
  const int64_t threads_needed = (numel + 3) / 4;
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "randomized_svd: sketch too large (", numel,
              " elements)");
  gaussian_philox_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), numel, static_cast<unsigned long long>(seed));
  TAILLOR_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------------
// Batched GEMM on row-major tensors. C[i] = op(A[i]) op(B[i]) with op(A) M x K, op(B) K x N, C (b, M, N);
// A is stored (b, M, K), or (b, K, M) when trans_a; B is stored (b, K, N), or (b, N, K) when trans_b.
//
// cuBLAS is column-major: a row-major r x c matrix X is the column-major c x r matrix X^T with leading
// dimension c. So we ask cuBLAS for C^T = op(B)^T op(A)^T (column-major N x M, ldc = N):
//   first operand  = storage of B, op = trans_b ? T : N, ld = columns of B's storage (N, or K if trans_b)
//   second operand = storage of A, op = trans_a ? T : N, ld = columns of A's storage (K, or M if trans_a)
// Check for !trans_a, !trans_b: col-major B^T (N x K) times A^T (K x M) = (A B)^T (N x M). Correct.
// float32 uses CUBLAS_COMPUTE_32F_PEDANTIC (no TF32) unless tf32 asks for CUBLAS_COMPUTE_32F_FAST_TF32;
// float64 uses CUBLAS_COMPUTE_64F_PEDANTIC.
// ---------------------------------------------------------------------------------------------------
at::Tensor bgemm(const at::Tensor& A_in, bool trans_a, const at::Tensor& B_in, bool trans_b, bool tf32 = false) {
  const at::Tensor A = A_in.contiguous();
  const at::Tensor B = B_in.contiguous();
  TORCH_INTERNAL_ASSERT(A.dim() == 3 && B.dim() == 3 && A.size(0) == B.size(0));
  TORCH_INTERNAL_ASSERT(A.scalar_type() == B.scalar_type());
  const int64_t batch = A.size(0);
  const int64_t M = trans_a ? A.size(2) : A.size(1);
  const int64_t K = trans_a ? A.size(1) : A.size(2);
  const int64_t Kb = trans_b ? B.size(2) : B.size(1);
  const int64_t N = trans_b ? B.size(1) : B.size(2);
  TORCH_INTERNAL_ASSERT(K == Kb, "bgemm: inner dims differ: ", A.sizes(), " vs ", B.sizes());
  at::Tensor C = at::empty({batch, M, N}, A.options());
  if (batch == 0 || M == 0 || N == 0) return C;
  if (K == 0) return C.zero_();

  const bool f64 = A.scalar_type() == at::kDouble;
  TORCH_INTERNAL_ASSERT(f64 || A.scalar_type() == at::kFloat);
  const cudaDataType dtype = f64 ? CUDA_R_64F : CUDA_R_32F;
  const cublasComputeType_t compute =
      f64 ? CUBLAS_COMPUTE_64F_PEDANTIC : (tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_PEDANTIC);
  const double alpha64 = 1.0, beta64 = 0.0;
  const float alpha32 = 1.0f, beta32 = 0.0f;
  const void* alpha = f64 ? static_cast<const void*>(&alpha64) : static_cast<const void*>(&alpha32);
  const void* beta = f64 ? static_cast<const void*>(&beta64) : static_cast<const void*>(&beta32);

  const int ldb = static_cast<int>(B.size(2));
  const int lda = static_cast<int>(A.size(2));
  const int ldc = static_cast<int>(N);
  const long long stride_b = B.size(1) * B.size(2);
  const long long stride_a = A.size(1) * A.size(2);
  const long long stride_c = M * N;

  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  TAILLOR_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
      static_cast<int>(M), static_cast<int>(K), alpha, B.data_ptr(), dtype, ldb, stride_b, A.data_ptr(), dtype,
      lda, stride_a, beta, C.data_ptr(), dtype, ldc, stride_c, static_cast<int>(batch), compute,
      CUBLAS_GEMM_DEFAULT));
  return C;
}

// One cuSOLVER handle per (thread, device), created on first use and bound to the current stream on every
// call. Handles are deliberately never destroyed: destroying them at exit can race CUDA's own teardown.
cusolverDnHandle_t solver_handle() {
  static thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  int device = -1;
  TAILLOR_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    cusolverDnHandle_t h = nullptr;
    TAILLOR_CUSOLVER_CHECK(cusolverDnCreate(&h));
    it = handles.emplace(device, h).first;
  }
  TAILLOR_CUSOLVER_CHECK(cusolverDnSetStream(it->second, at::cuda::getCurrentCUDAStream()));
  return it->second;
}

// In-place batched Cholesky of symmetric positive definite G (b, c, c), float64, contiguous. Returns the
// upper factor R (b, c, c) with G = R^T R, and info (b,) int32 (0: success; j > 0: leading minor j is not
// positive definite).
//
// G is symmetric, so its row-major storage is also its column-major storage. We factor the column-major
// lower triangle, G = L L^T. Read row-major, the column-major L is L^T = R, upper triangular. potrfBatched
// uses the other triangle as workspace, so it is cleared with triu.
std::tuple<at::Tensor, at::Tensor> cholesky_upper_(at::Tensor& G, cusolverDnHandle_t solver) {
  TORCH_INTERNAL_ASSERT(G.scalar_type() == at::kDouble && G.is_contiguous() && G.dim() == 3);
  const int64_t batch = G.size(0);
  const int64_t c = G.size(1);
  // Device array of per-matrix pointers: base + i * c * c * sizeof(double).
  const auto i64 = G.options().dtype(at::kLong);
  at::Tensor ptrs = at::arange(batch, i64)
                        .mul_(c * c * static_cast<int64_t>(sizeof(double)))
                        .add_(reinterpret_cast<int64_t>(G.data_ptr<double>()));
  at::Tensor info = at::empty({batch}, G.options().dtype(at::kInt));
  TAILLOR_CUSOLVER_CHECK(cusolverDnDpotrfBatched(solver, CUBLAS_FILL_MODE_LOWER, static_cast<int>(c),
                                                 reinterpret_cast<double**>(ptrs.data_ptr<int64_t>()),
                                                 static_cast<int>(c), info.data_ptr<int>(),
                                                 static_cast<int>(batch)));
  return {at::triu(G), info};
}

// Symmetric eigendecomposition of the batch G (b, c, c), float64, contiguous, like at::linalg_eigh(G): eigenvalues
// ascending (b, c) and eigenvectors as columns (b, c, c). For c > 32, at::linalg_eigh calls cuSOLVER once per
// matrix (224 sequential, latency-bound calls for a 7B model's head frames); cuSOLVER >= 11.7.1 solves the whole
// batch in one call (cusolverDnXsyevBatched). Matrices it does not converge on (info != 0) and a cuSOLVER without
// that routine, or one that refuses the call, take at::linalg_eigh. One host synchronisation (the info flags).
std::tuple<at::Tensor, at::Tensor> batched_eigh(const at::Tensor& G, cusolverDnHandle_t solver) {
  TORCH_INTERNAL_ASSERT(G.scalar_type() == at::kDouble && G.is_contiguous() && G.dim() == 3);
#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
  const int64_t batch = G.size(0), c = G.size(1);
  // G is symmetric, so its row-major storage is also its column-major storage. cuSOLVER overwrites it with the
  // eigenvectors as column-major columns, which read row-major are rows: transposed back below.
  at::Tensor A = G.clone();
  at::Tensor W = at::empty({batch, c}, G.options());
  at::Tensor info = at::zeros({batch}, G.options().dtype(at::kInt));
  cusolverDnParams_t params = nullptr;
  TAILLOR_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
  size_t device_bytes = 0, host_bytes = 0;
  cusolverStatus_t status = cusolverDnXsyevBatched_bufferSize(
      solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, c, CUDA_R_64F, A.data_ptr(), c, CUDA_R_64F,
      W.data_ptr(), CUDA_R_64F, &device_bytes, &host_bytes, batch);
  std::vector<char> host_workspace(host_bytes);
  if (status == CUSOLVER_STATUS_SUCCESS) {
    at::Tensor device_workspace = at::empty({static_cast<int64_t>(device_bytes)}, G.options().dtype(at::kByte));
    status = cusolverDnXsyevBatched(solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, c, CUDA_R_64F,
                                    A.data_ptr(), c, CUDA_R_64F, W.data_ptr(), CUDA_R_64F,
                                    device_workspace.data_ptr(), device_bytes,
                                    host_bytes > 0 ? host_workspace.data() : nullptr, host_bytes,
                                    info.data_ptr<int>(), batch);
  }
  TAILLOR_CUSOLVER_CHECK(cusolverDnDestroyParams(params));
  if (status == CUSOLVER_STATUS_SUCCESS) {
    const at::Tensor failed = info.ne(0);
    at::Tensor E = A.transpose(1, 2).contiguous();
    if (failed.any().item<bool>()) {  // also the synchronisation that keeps host_workspace alive long enough
      const at::Tensor idx = failed.nonzero().view({-1});
      auto [w, e] = at::linalg_eigh(G.index_select(0, idx), "L");
      W.index_copy_(0, idx, w);
      E.index_copy_(0, idx, e);
    }
    return {W, E};
  }
#endif
  return at::linalg_eigh(G, "L");
}

// Householder QR of X (b, r, c), r >= c, with column signs fixed so that diag(R) >= 0 (like CholeskyQR):
// unconditionally stable, and orthonormal columns even for zero columns.
at::Tensor householder_orth(const at::Tensor& X) {
  auto [Q, R] = at::linalg_qr(X, "reduced");
  at::Tensor sign = R.diagonal(0, -2, -1).sign();
  sign = at::where(sign.eq(0), at::ones_like(sign), sign);
  return (Q * sign.unsqueeze(-2)).contiguous();
}

// `passes` CholeskyQR passes over X (b, r, c), float32, r >= c, in float64 (2: CholeskyQR2, orthonormal to
// working precision; 1: well conditioned): Q (b, r, c) float32 and, on the device, the flags (b,) bool of the
// matrices whose result cannot be trusted (Cholesky failure or diag-ratio above kMaxDiagRatio in any pass).
// No host synchronisation.
std::tuple<at::Tensor, at::Tensor> cholesky_qr(const at::Tensor& X, cusolverDnHandle_t solver, int passes) {
  TORCH_INTERNAL_ASSERT(X.dim() == 3 && X.scalar_type() == at::kFloat && X.size(1) >= X.size(2));
  const int64_t batch = X.size(0);
  const int64_t c = X.size(2);
  at::Tensor W = X.to(at::kDouble);
  at::Tensor bad = at::zeros({batch}, X.options().dtype(at::kBool));
  const at::Tensor eye = at::eye(c, W.options());
  for (int pass = 0; pass < passes; ++pass) {
    at::Tensor G = bgemm(W, /*trans_a=*/true, W, /*trans_b=*/false);  // W^T W, (b, c, c)
    auto [R, info] = cholesky_upper_(G, solver);
    const at::Tensor d = R.diagonal(0, -2, -1);
    const at::Tensor dmin = d.amin(-1);
    const at::Tensor dmax = d.amax(-1);
    // NaN-safe: each comparison is false for NaN, so a NaN diagonal is flagged.
    const at::Tensor ok = info.eq(0).logical_and(dmin.gt(0)).logical_and(dmax.le(dmin * kMaxDiagRatio));
    bad.logical_or_(ok.logical_not());
    // Flagged matrices get R = I so the solve stays finite; the caller replaces their result.
    R = at::where(bad.view({batch, 1, 1}), eye, R);
    W = at::linalg_solve_triangular(R, W, /*upper=*/true, /*left=*/false);  // W <- W R^{-1}
  }
  return {W.to(at::kFloat).contiguous(), bad};
}

// orth() of the range finder: `passes` CholeskyQR passes with their flags OR-ed into `flags` (robust == false),
// or Householder QR.
struct Orthonormalizer {
  cusolverDnHandle_t solver;
  bool robust;
  at::Tensor flags;  // (b,) bool on the device; unused when robust

  at::Tensor operator()(const at::Tensor& X, int passes) {
    if (robust) return householder_orth(X);
    auto [Q, bad] = cholesky_qr(X, solver, passes);
    flags.logical_or_(bad);
    return Q;
  }
};

// Range finder with subspace iteration: an orthonormal basis Q (b, m, l) of the dominant range of A (b, m, n)
// from the sketch omega (b, n, l). Sets `nonfinite` (b,) bool on the device: A Omega has a NaN or Inf.
// tf32: the products with A run on TF32 tensor cores (see the header).
at::Tensor range_finder(const at::Tensor& A, const at::Tensor& omega, int64_t niter, Orthonormalizer& orth,
                        at::Tensor* nonfinite, bool tf32) {
  const at::Tensor Y = bgemm(A, false, omega, false, tf32);  // (b, m, l)
  if (nonfinite != nullptr) *nonfinite = at::isfinite(Y).logical_not().flatten(1).any(1);
  at::Tensor Q = orth(Y, niter > 0 ? 1 : 2);
  for (int64_t it = 0; it < niter; ++it) {
    const at::Tensor Z = orth(bgemm(A, true, Q, false, tf32), 1);           // A^T Q: (b, n, l)
    Q = orth(bgemm(A, false, Z, false, tf32), it + 1 < niter ? 1 : 2);      // A Z:   (b, m, l)
  }
  return Q;
}

at::Tensor gaussian_sketch(int64_t batch, int64_t n, int64_t l, int64_t seed, const at::TensorOptions& f32) {
  at::Tensor omega = at::empty({batch, n, l}, f32);
  fill_gaussian(omega, seed);
  return omega;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cuda(const at::Tensor& A_in, int64_t k,
                                                                   int64_t niter, int64_t oversample,
                                                                   int64_t seed, bool tf32) {
  const c10::cuda::CUDAGuard device_guard(A_in.device());
  const int64_t batch = A_in.size(0), m = A_in.size(1), n = A_in.size(2);
  const int64_t mn = std::min(m, n);
  const int64_t l = oversample >= mn - k ? mn : k + oversample;  // min(k + oversample, mn) without overflow
  const auto f32 = A_in.options().dtype(at::kFloat);
  if (batch == 0) {
    return {at::empty({0, m, k}, f32), at::empty({0, k}, f32), at::empty({0, n, k}, f32)};
  }
  const at::Tensor A = A_in.to(at::kFloat).contiguous();  // half inputs: converted once
  cusolverDnHandle_t solver = solver_handle();

  // Range finder with subspace iteration (CholeskyQR, flags kept on the device).
  Orthonormalizer orth{solver, /*robust=*/false, at::zeros({batch}, A.options().dtype(at::kBool))};
  at::Tensor nonfinite;
  at::Tensor Q = range_finder(A, gaussian_sketch(batch, n, l, seed, f32), niter, orth, &nonfinite, tf32);

  // The one host synchronisation of the range finder: NaN/Inf and the matrices CholeskyQR could not handle.
  const at::Tensor status = at::stack({nonfinite.any(), orth.flags.any()}).cpu();
  TORCH_CHECK_VALUE(!status[0].item<bool>(), "randomized_svd: A contains NaN or Inf (shape ", A_in.sizes(),
                    ", detected on the sketch A Omega)");
  if (status[1].item<bool>()) {
    // Redo the flagged matrices with Householder QR, from the same (regenerated) sketch columns.
    const at::Tensor idx = orth.flags.nonzero().view({-1});
    Orthonormalizer robust{solver, /*robust=*/true, at::Tensor()};
    const at::Tensor omega = gaussian_sketch(batch, n, l, seed, f32).index_select(0, idx);
    Q.index_copy_(0, idx, range_finder(A.index_select(0, idx), omega, niter, robust, nullptr, tf32));
  }

  // Small SVD of B = Q^T A through the eigenproblem of B B^T (float64). Bt is float32 whatever the precision:
  // it sets sigma, U and V, so the subspace error of a TF32 range finder does not also become a sigma error.
  const at::Tensor Bt = bgemm(A, true, Q, false);  // A^T Q = B^T: (b, n, l)
  const at::Tensor Bt64 = Bt.to(at::kDouble);
  const at::Tensor G = bgemm(Bt64, true, Bt64, false);  // B B^T: (b, l, l)
  auto [evals, evecs] = batched_eigh(G, solver);       // ascending
  const at::Tensor lambda = evals.flip({-1}).narrow(-1, 0, k);
  const at::Tensor E = evecs.flip({-1}).narrow(-1, 0, k).to(at::kFloat).contiguous();  // (b, l, k)
  const at::Tensor S64 = lambda.clamp_min(0.0).sqrt();                                  // (b, k)

  at::Tensor U = bgemm(Q, false, E, false);  // (b, m, k)
  const at::Tensor Vraw = bgemm(Bt, false, E, false);  // B^T E = A^T U: (b, n, k), column j has norm sigma_j
  const double rel_tol = static_cast<double>(FLT_EPSILON) * static_cast<double>(std::max(m, n));
  const at::Tensor tol = S64.narrow(-1, 0, 1) * rel_tol;  // (b, 1)
  const at::Tensor keep = S64.gt(tol);
  const at::Tensor inv_sigma = at::where(keep, S64.reciprocal(), at::zeros_like(S64)).to(at::kFloat);
  const at::Tensor Vscaled = Vraw * inv_sigma.unsqueeze(-2);
  auto [V, bad] = cholesky_qr(Vscaled, solver, 2);  // (b, n, k)
  if (bad.any().item<bool>()) {  // zeroed (noise) columns: Householder completes them orthonormally
    const at::Tensor idx = bad.nonzero().view({-1});
    V.index_copy_(0, idx, householder_orth(Vscaled.index_select(0, idx)));
  }
  return {U, S64.to(at::kFloat), V};
}

}  // namespace taillor
