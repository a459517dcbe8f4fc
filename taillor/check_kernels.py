"""``taillor check-kernels``: compile every Triton kernel ahead of time and check its shared memory.

For each entry of ``taillor._kernels.AOT_KERNELS`` and each requested architecture, the kernel is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. That needs no GPU (only the
PTX assembler that ships with Triton). Compilation succeeds even when a kernel asks for more shared memory
than the device has (the launch fails later), so the compiled ``metadata.shared`` is compared with the
per-block limit of each architecture. Prints one table row per (kernel, variant, dtype, arch) and returns
non-zero if any compilation fails or any kernel exceeds the limit.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import time

# Usable shared memory per thread block (opt-in maximum), in bytes.
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _parse_arch(text):
    """'sm_80,sm_90' -> [80, 90]; raises ValueError naming the bad item."""
    archs = []
    for item in text.split(","):
        item = item.strip().lower()
        cc = item[3:] if item.startswith("sm_") else item
        if not cc.isdigit() or int(cc) not in SHARED_LIMITS:
            raise ValueError(f"unknown architecture {item!r}; known: "
                             + ", ".join(f"sm_{c}" for c in sorted(SHARED_LIMITS)))
        archs.append(int(cc))
    return archs


def _make_source(fn, signature, constexprs):
    from triton.compiler import ASTSource
    try:
        # Triton >= 3.2 (3.6, 3.8): signature keyed by name, constexprs listed as "constexpr".
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError:
        # Older Triton: index-keyed signature without constexprs, and ``constants``.
        names = list(signature)
        sig = {i: ty for i, (n, ty) in enumerate(signature.items()) if ty != "constexpr"}
        consts = {names.index(n): v for n, v in constexprs.items()}
        return ASTSource(fn=fn, signature=sig, constants=consts)


def compile_entry(entry, cc):
    """Compile one AOT entry for compute capability ``cc``; returns the compiled kernel's metadata."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = _make_source(entry["fn"], entry["signature"], entry["constexprs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]})
    return compiled.metadata


def _rerun_without_interpreter(argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "taillor.check_kernels", *(argv if argv is not None else sys.argv[1:])]
    return subprocess.call(cmd, env=env)


def _build(index, cc):
    """Compile AOT entry ``index`` for ``cc``: (shared bytes, num_warps, error or None). Runs in a worker."""
    from taillor._kernels import AOT_KERNELS

    entry = AOT_KERNELS[index]
    try:
        meta = compile_entry(entry, cc)
        return int(meta.shared), int(meta.num_warps), None
    except Exception as err:  # report every kernel, then fail
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, entry["num_warps"], f"{type(err).__name__}: {first_line}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="taillor check-kernels",
                                     description="Compile every Triton kernel for the given GPU architectures "
                                                 "(no GPU needed) and check its shared memory.")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated list, e.g. sm_80,sm_90")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="parallel compile processes (default: number of CPUs, at most 8)")
    args = parser.parse_args(argv)
    try:
        archs = _parse_arch(args.arch)
    except ValueError as err:
        parser.error(str(err))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter replaces @triton.jit kernels with Python ones that cannot be compiled.
        return _rerun_without_interpreter(argv)

    import triton
    from taillor._kernels import AOT_KERNELS

    start = time.perf_counter()
    jobs = [(i, cc) for i in range(len(AOT_KERNELS)) for cc in archs]
    if args.jobs == 1 or len(jobs) == 1:
        results = [_build(i, cc) for i, cc in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Triton/CUDA state
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=ctx) as pool:
            results = list(pool.map(_build, *zip(*jobs, strict=True)))

    header = ("kernel", "variant", "dtype", "arch", "shared", "limit", "warps", "stages", "status")
    rows, failures = [], 0
    for (i, cc), (shared, warps, error) in zip(jobs, results, strict=True):
        entry, limit = AOT_KERNELS[i], SHARED_LIMITS[cc]
        if error is not None:
            status = f"FAIL: {error}"
        elif shared > limit:
            status = "FAIL: shared memory over limit"
        else:
            status = "ok"
        failures += status != "ok"
        rows.append((entry["name"], entry["variant"], entry["dtype"], f"sm_{cc}",
                     "-" if shared is None else str(shared), str(limit), str(warps), str(entry["num_stages"]), status))

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths)))
    for row in rows:
        print(fmt.format(*row))
    n = len(rows)
    print(f"{n - failures}/{n} kernel builds compile and fit in shared memory "
          f"(triton {triton.__version__}, {time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
