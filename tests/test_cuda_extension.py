"""The optional CUDA extension taillor._C (csrc/, built by setup.py).

Without the extension these tests skip with a reason, unless TAILLOR_REQUIRE_CUDA_EXT=1 (CI builds it and must not
lose it silently). Import and argument checks need no GPU; the numerical tests are marked `gpu` and compare
taillor._C.randomized_svd against torch.linalg.svd in float64 on the very matrix it was given.
"""
import importlib
import os

import pytest
import torch

from conftest import TOLERANCE, assert_close

REQUIRE = os.environ.get("TAILLOR_REQUIRE_CUDA_EXT") == "1"


def _load_extension():
    try:
        return importlib.import_module("taillor._C"), None
    except ModuleNotFoundError as exc:
        if exc.name != "taillor._C":
            raise
        return None, "taillor._C is not built (pip install --no-build-isolation -e . with a CUDA toolkit, see setup.py)"
    except ImportError as exc:  # built, but broken (e.g. built against another torch)
        return None, f"taillor._C is built but fails to import: {exc}"


_C, _MISSING = _load_extension()


@pytest.fixture(scope="module")
def C():
    if _C is None:
        if REQUIRE:
            pytest.fail(f"TAILLOR_REQUIRE_CUDA_EXT=1 but {_MISSING}")
        pytest.skip(_MISSING)
    return _C


def gpu_test(fn):
    """Marks a test `gpu` and skips it where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


# ----------------------------------------------------------------------------------------------- no GPU needed


def test_extension_exposes_randomized_svd_with_docstring(C):
    assert callable(C.randomized_svd)
    doc = C.randomized_svd.__doc__
    assert doc and "randomized_svd" in doc
    for word in ("niter", "oversample", "seed", "float32"):
        assert word in doc


@pytest.mark.parametrize(
    "make, kwargs, error, words",
    [
        (lambda: torch.randn(4, 5), {}, ValueError, ["3 dims", "[4, 5]"]),
        (lambda: torch.randn(1, 4, 5, dtype=torch.float64), {}, TypeError, ["torch.float64"]),
        (lambda: torch.randn(1, 4, 5), {"k": 0}, ValueError, ["k=0", "[1, 4]"]),
        (lambda: torch.randn(1, 4, 5), {"k": 5}, ValueError, ["k=5", "[1, 4]"]),
        (lambda: torch.randn(1, 4, 5), {"niter": -1}, ValueError, ["niter=-1"]),
        (lambda: torch.randn(1, 4, 5), {"oversample": -2}, ValueError, ["oversample=-2"]),
        (lambda: torch.randn(1, 5, 4).transpose(1, 2), {}, ValueError, ["contiguous"]),
        (lambda: torch.randn(1, 4, 5), {}, ValueError, ["CUDA tensor", "cpu"]),
    ],
    ids=["2d", "float64", "k0", "k-too-big", "niter", "oversample", "non-contiguous", "cpu"],
)
def test_rejects_bad_arguments_naming_the_value(C, make, kwargs, error, words):
    args = {"k": 2, "niter": 1, "oversample": 1, "seed": 0, **kwargs}
    with pytest.raises(error) as info:
        C.randomized_svd(make(), args["k"], args["niter"], args["oversample"], args["seed"])
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------------------------- GPU


def _matrix(b, m, n, spectrum, dtype, seed=0):
    """b matrices m x n with singular values spectrum(i), i = 0..min(m, n)-1, random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(b, m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(b, n, r, generator=g, dtype=torch.float64))
    s = spectrum(torch.arange(r, dtype=torch.float64))
    return ((U * s) @ V.mT).to(dtype).cuda()


def _decaying(i):
    return torch.exp(-i / 8)


def _flat(i):
    return torch.ones_like(i)


def _check_factors(A, U, S, V, k):
    b, m, n = A.shape
    assert U.shape == (b, m, k) and S.shape == (b, k) and V.shape == (b, n, k)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert U.device == A.device
    for t in (U, S, V):
        assert torch.isfinite(t).all()
    assert (S[:, :-1] >= S[:, 1:]).all(), "S must be descending"
    assert (S >= 0).all()
    eye = torch.eye(k, device=A.device)
    assert_close(U.mT @ U, eye.expand(b, k, k), "orthonormal, loose", "U")
    assert_close(V.mT @ V, eye.expand(b, k, k), "orthonormal, loose", "V")


def _rel_err(S, A, k):
    ref = torch.linalg.svdvals(A.double())[:, :k]
    return ((S.double() - ref).abs() / ref).max().item()


def _largest_angle(X, Y):
    """Largest principal angle between the column spans of X and Y (same width), in radians."""
    c = torch.linalg.svdvals(X.double().mT @ Y.double()).amin(-1).clamp(max=1.0)
    return torch.arccos(c).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 200, 120), (3, 96, 160)], ids=["tall", "wide"])
@gpu_test
def test_decaying_spectrum_matches_svd(C, dtype, shape):
    k = 16
    A = _matrix(*shape, _decaying, dtype)
    U, S, V = C.randomized_svd(A, k, 2, k, 0)
    _check_factors(A, U, S, V, k)
    assert _rel_err(S, A, k) <= TOLERANCE["sigma"]
    U0, S0, V0h = torch.linalg.svd(A.double(), full_matrices=False)
    assert _largest_angle(U, U0[:, :, :k]) < TOLERANCE["angle"]
    assert _largest_angle(V, V0h.mT[:, :, :k]) < TOLERANCE["angle"]
    # Near-optimal rank-k approximation (Eckart-Young bound: the tail of the spectrum).
    err = torch.linalg.matrix_norm(A.double() - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT)
    opt = S0[:, k:].square().sum(-1).sqrt()
    assert (err <= opt * (1 + TOLERANCE["sigma"]) + 1e-6).all()  # + 1e-6: float32 rounding of a near-zero tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@gpu_test
def test_flat_spectrum_matches_svd(C, dtype):
    # Exactly flat in float32: Q spans a subspace of range(A), so the Rayleigh-Ritz values are exact. The bf16
    # cast perturbs the spectrum into a nearly flat one, where a rank-2k sketch is only approximately right.
    k = 10
    A = _matrix(2, 150, 90, _flat, dtype)
    U, S, V = C.randomized_svd(A, k, 2, k, 0)
    _check_factors(A, U, S, V, k)
    assert _rel_err(S, A, k) <= TOLERANCE["flat spectrum"][dtype]


@gpu_test
def test_mixed_batch_each_matrix_on_its_own(C):
    # One batch mixing the CholeskyQR2 path (decaying), the Householder fallback (zero, rank-deficient) and a
    # steep spectrum: every matrix must come out as if factored alone.
    k, m, n = 8, 90, 70
    mats = [
        _matrix(1, m, n, _decaying, torch.float32, seed=1),
        torch.zeros(1, m, n, device="cuda"),
        _matrix(1, m, n, lambda i: torch.where(i < 3, 1.0 / (1 + i), 0.0), torch.float32, seed=2),
        _matrix(1, m, n, lambda i: 10.0 ** (-i / 2), torch.float32, seed=3),
    ]
    A = torch.cat(mats).contiguous()
    U, S, V = C.randomized_svd(A, k, 2, k, 7)
    _check_factors(A, U, S, V, k)
    for i, Ai in enumerate(mats):
        ref = torch.linalg.svdvals(Ai.double())[:, :k]
        scale = max(ref.max().item(), 1.0)  # the absolute part of the bound is relative to the largest value
        assert_close(S[i : i + 1].double() / scale, ref / scale, "batch member", f"matrix {i}")


@gpu_test
def test_deterministic_for_a_fixed_seed(C):
    A = _matrix(2, 150, 90, _flat, torch.float32)
    first = C.randomized_svd(A, 10, 2, 10, 1234)
    second = C.randomized_svd(A, 10, 2, 10, 1234)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    other = C.randomized_svd(A, 10, 2, 10, 1235)
    assert not torch.equal(first[0], other[0]), "another seed must give another sketch"


@gpu_test
def test_zero_matrix_gives_zero_values_and_orthonormal_vectors(C):
    A = torch.zeros(2, 50, 40, device="cuda")
    U, S, V = C.randomized_svd(A, 8, 2, 8, 0)
    _check_factors(A, U, S, V, 8)
    assert (S == 0).all()


@gpu_test
def test_rank_deficient_matrix(C):
    # float32 only: a bf16 cast of a rank-5 matrix has full rank (rounding noise ~1e-3).
    r, k = 5, 10
    A = _matrix(2, 80, 60, lambda i: torch.where(i < r, 1.0 / (1 + i), 0.0), torch.float32)
    U, S, V = C.randomized_svd(A, k, 2, k, 0)
    _check_factors(A, U, S, V, k)
    assert _rel_err(S[:, :r], A, r) <= TOLERANCE["sigma"]
    assert (S[:, r:] <= TOLERANCE["rank deficient"] * S[:, :1]).all()
    err = torch.linalg.matrix_norm(A.double() - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT)
    assert (err <= TOLERANCE["rank deficient"] * torch.linalg.matrix_norm(A.double())).all()


@gpu_test
def test_edge_arguments(C):
    A = _matrix(2, 30, 20, _decaying, torch.float32)
    # k = min(m, n) with a huge oversample (clamped, no overflow) is an exact SVD.
    U, S, V = C.randomized_svd(A, 20, 1, 2**62, 0)
    _check_factors(A, U, S, V, 20)
    assert _rel_err(S, A, 20) <= TOLERANCE["exact sketch"][torch.float32]
    # niter = 0 is allowed (less accurate on a decaying spectrum).
    U, S, V = C.randomized_svd(_matrix(3, 200, 120, _decaying, torch.float32), 16, 0, 16, 0)
    assert torch.isfinite(S).all()
    # An empty batch gives empty factors.
    U, S, V = C.randomized_svd(torch.empty(0, 30, 20, device="cuda"), 4, 2, 4, 0)
    assert U.shape == (0, 30, 4) and S.shape == (0, 4) and V.shape == (0, 20, 4)


@gpu_test
def test_rejects_non_finite_input(C):
    A = _matrix(1, 30, 20, _decaying, torch.float32)
    A[0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        C.randomized_svd(A, 4, 2, 4, 0)


# ----------------------------------------------------------------------------------------------- TF32 range finder


def test_rejects_an_unknown_precision(C):
    with pytest.raises(ValueError, match='precision must be "fp32" or "tf32", got "bf16"'):
        C.randomized_svd(torch.randn(1, 4, 5), 2, 1, 1, 0, "bf16")


@pytest.mark.parametrize("value, expected", [("", "fp32"), ("fp32", "fp32"), ("tf32", "tf32"), (" TF32 ", "tf32"),
                                             ("fp16", None)])
def test_svd_precision_setting(monkeypatch, value, expected):
    from taillor.backends.cuda_ext import svd_precision
    monkeypatch.setenv("TAILLOR_SVD_PRECISION", value)
    if expected is None:
        with pytest.raises(ValueError, match="TAILLOR_SVD_PRECISION must be fp32 or tf32, got 'fp16'"):
            svd_precision()
    else:
        assert svd_precision() == expected


@pytest.mark.parametrize("shape", [(3, 512, 384), (2, 384, 1100)], ids=["tall", "wide"])
@gpu_test
def test_tf32_range_finder_error_against_fp32_and_the_float64_oracle(C, shape, record_property):
    """The TF32 range finder (sketch and power iterations on tensor cores) keeps the frame contract; its error and
    the fp32 path's, both against float64, go into the JUnit XML (benchmarks/gpu_check.sh reports them)."""
    k = 16
    A = _matrix(*shape, lambda i: (1 + i) ** -0.5, torch.float32)  # the frames benchmark's slow decay
    U0, S0, V0h = torch.linalg.svd(A.double(), full_matrices=False)
    errors = {}
    for precision in ("fp32", "tf32"):
        U, S, V = C.randomized_svd(A, k, 2, 8, 0, precision)
        _check_factors(A, U, S, V, k)
        errors[precision] = (_rel_err(S, A, k), _largest_angle(V, V0h.mT[:, :, :k]))
        record_property(f"{precision}_sigma_rel_error", f"{errors[precision][0]:.3e}")
        record_property(f"{precision}_max_angle_rad", f"{errors[precision][1]:.3e}")
    for precision, (sigma_err, angle) in errors.items():
        assert sigma_err <= TOLERANCE["sigma"], (precision, errors)
        assert angle < TOLERANCE["angle"], (precision, errors)


@gpu_test
def test_tf32_setting_reaches_the_extension(C, monkeypatch):
    """TAILLOR_SVD_PRECISION=tf32 through taillor.randomized_svd: the same contract against float64."""
    import taillor
    A = _matrix(1, 256, 192, _decaying, torch.float32)[0]
    monkeypatch.setenv("TAILLOR_SVD_PRECISION", "tf32")
    U, S, V = taillor.randomized_svd(A, 16)
    _check_factors(A[None], U[None], S[None], V[None], 16)
    assert _rel_err(S[None], A[None], 16) <= TOLERANCE["sigma"]
