"""``taillor check-kernels``: compile every Triton launch taillor makes, ahead of time, and check its shared memory.

The launches come from :mod:`taillor.kernel_call_sites`: the real launchers run on meta tensors shaped like a
model layer and are recorded instead of launched. Each distinct specialization is compiled the way Triton's own
launcher would compile it — the signature and attributes (pointer alignment, integers divisible by 16, integers
equal to 1 as constants) come from Triton's run-time specialization code applied to the recorded arguments — with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, which needs no GPU (only the PTX assembler
that ships with Triton). A launch site tunes over a list of configs; every config run time could pick on an
architecture (those whose estimated shared memory fits its limit, :func:`configs_for`) is compiled, and each
compiled ``metadata.shared`` is compared with the architecture's per-block limit (compilation succeeds even when a
kernel asks for more than the device has). Prints one table row per (kernel, call site, dtype, arch, config) and
returns non-zero if any compilation fails or exceeds the limit. ``--largest-only`` compiles only the config with
the largest shared-memory footprint per site (the quick check).

Another Triton (the GPU machine's, e.g. 3.6 with torch 2.11): the same check runs from a second environment,

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install "torch==2.11.*" "triton==3.6.*" numpy
    /tmp/t36/bin/pip install --no-deps -e . && /tmp/t36/bin/python -m taillor.check_kernels

(``--no-deps``: the rest of taillor's dependencies are not needed to record and compile the launches).
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


def specializations():
    """[{kernel, site, dtype, args, constexprs, configs, smem}] for each distinct specialization of the call sites."""
    from taillor.kernel_call_sites import record_call_sites

    def trait(arg):  # what Triton specializes on: tensor dtypes (meta tensors: 16-byte aligned), ints 1 or %16
        if isinstance(arg, bool) or not isinstance(arg, (int, float)):
            return str(getattr(arg, "dtype", arg))
        return "float" if isinstance(arg, float) else ("1" if arg == 1 else "D" if arg % 16 == 0 else "i")

    seen, out = set(), []
    for site, label, rec in record_call_sites():
        key = (rec.kernel.fn.__name__, tuple(map(trait, rec.args)), repr(sorted(rec.constexprs.items())),
               repr(rec.configs))
        if key not in seen:
            seen.add(key)
            out.append({"kernel": rec.kernel, "site": f"{site}: {rec.site}", "dtype": label, "args": rec.args,
                        "constexprs": rec.constexprs, "configs": rec.configs, "smem": rec.smem})
    return out


def config_for(entry, cc):
    """The config run time could pick on ``cc`` with the largest shared memory (the launchers drop configs whose
    estimate exceeds the device's limit, then tune over the rest)."""
    from taillor._kernels.launch import configs_within, smem_estimate
    if len(entry["configs"]) == 1:  # a fixed launch config (penalty Grams, fp32 pair sites)
        return entry["configs"][0]
    itemsize, n_width = entry["smem"]
    kept = configs_within(entry["configs"], SHARED_LIMITS[cc], itemsize, n_width)
    return max(kept, key=lambda c: smem_estimate(c, itemsize, n_width))


def configs_for(entry, cc):
    """Every config run time could pick on ``cc``: the launchers drop configs whose estimated shared memory
    exceeds the device's limit, then tune over the rest."""
    from taillor._kernels.launch import configs_within
    if len(entry["configs"]) == 1:
        return list(entry["configs"])
    itemsize, n_width = entry["smem"]
    return configs_within(entry["configs"], SHARED_LIMITS[cc], itemsize, n_width)


def compile_entry(entry, cc, config=None):
    """Compile one specialization for compute capability ``cc`` as Triton's launcher would, with ``config``
    (default: :func:`config_for`'s); returns the compiled metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    try:  # Triton's own binder (3.8): the signature and attributes its launcher derives from the arguments
        from triton.runtime.jit import create_function_from_signature
    except ImportError as err:
        raise RuntimeError(f"triton {triton.__version__} has no runtime.jit.create_function_from_signature: "
                           "check-kernels reproduces run-time specialization with Triton 3.8's binder") from err

    fn, config = entry["kernel"], config if config is not None else config_for(entry, cc)
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = {**entry["constexprs"], **config.kwargs, "num_warps": config.num_warps,
              "num_stages": config.num_stages}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*entry["args"], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled.metadata


def _rerun_without_interpreter(argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "taillor.check_kernels", *(argv if argv is not None else sys.argv[1:])]
    return subprocess.call(cmd, env=env)


_ENTRIES = None


def _build(index, cc, config_index, only):
    """Compile entry ``index`` for ``cc`` with its ``config_index``-th config of :func:`configs_for` (None: the
    largest): (shared bytes, num_warps, error or None). Runs in a worker."""
    global _ENTRIES
    if _ENTRIES is None:
        _ENTRIES = _selected(only)
    entry = _ENTRIES[index]
    config = config_for(entry, cc) if config_index is None else configs_for(entry, cc)[config_index]
    try:
        meta = compile_entry(entry, cc, config)
        return int(meta.shared), int(meta.num_warps), None
    except Exception as err:  # report every kernel, then fail
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, config.num_warps, f"{type(err).__name__}: {first_line}"


def _config_text(config) -> str:
    tiles = "".join(f"{k[6:].lower()}{v}" for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    return f"{tiles or '-'} w{config.num_warps}"


def _selected(only):
    entries = specializations()
    return [e for e in entries if only is None or only in e["site"]]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="taillor check-kernels",
                                     description="Compile every Triton kernel for the given GPU architectures "
                                                 "(no GPU needed) and check its shared memory.")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated list, e.g. sm_80,sm_90")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="parallel compile processes (default: number of CPUs, at most 8)")
    parser.add_argument("--largest-only", action="store_true",
                        help="compile only the largest-shared-memory config of each site (quick check)")
    parser.add_argument("--only", default=None,
                        help="compile only the call sites whose name contains this text (e.g. 'projection')")
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

    start = time.perf_counter()
    entries = _selected(args.only)
    if not entries:
        parser.error(f"--only {args.only!r} matches no call site")
    if args.largest_only:
        jobs = [(i, cc, None, args.only) for i in range(len(entries)) for cc in archs]
    else:
        jobs = [(i, cc, c, args.only) for i in range(len(entries)) for cc in archs
                for c in range(len(configs_for(entries[i], cc)))]
    if args.jobs == 1 or len(jobs) <= 8:  # a few builds: spawning workers (each imports torch) costs more
        results = [_build(*job) for job in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Triton/CUDA state
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=ctx) as pool:
            results = list(pool.map(_build, *zip(*jobs, strict=True)))

    header = ("kernel", "call site", "dtype", "arch", "config", "shared", "limit", "warps", "stages", "status")
    rows, failures = [], 0
    for (i, cc, c, _), (shared, warps, error) in zip(jobs, results, strict=True):
        entry, limit = entries[i], SHARED_LIMITS[cc]
        if error is not None:
            status = f"FAIL: {error}"
        elif shared > limit:
            status = "FAIL: shared memory over limit"
        else:
            status = "ok"
        failures += status != "ok"
        config = config_for(entry, cc) if c is None else configs_for(entry, cc)[c]
        rows.append((entry["kernel"].fn.__name__, entry["site"], entry["dtype"], f"sm_{cc}", _config_text(config),
                     "-" if shared is None else str(shared), str(limit), str(warps), str(config.num_stages), status))

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths)))
    for row in rows:
        print(fmt.format(*row))
    n = len(rows)
    what = "largest config" if args.largest_only else "every config"
    print(f"{n - failures}/{n} kernel builds ({len(entries)} run-time specializations x {len(archs)} archs, {what}) "
          "compile and fit in shared memory "
          f"(triton {triton.__version__}, {time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
