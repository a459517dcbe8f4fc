"""``taillor bench`` and the pytest-benchmark suites' shared code: TailLoRLinear against nn.Linear (the floor) and
PEFT LoRA (the peer), randomized SVD, penalty and frame building.

It lives in the installed package, not in ``benchmarks/``, because ``taillor bench`` must work from an installed
wheel, where ``benchmarks/`` does not exist. One job per module:

* :mod:`.shapes`: what is measured (the registry of shapes and cases, the speed targets, round counts);
* :mod:`.methods`: what the adapter suite compares (nn.Linear, PEFT LoRA, TailLoRLinear per backend, ...) and
  the check of their outputs against eager TailLoRLinear;
* :mod:`.spectral_methods`: what the other suites compare (the SVDs, projection and penalty forms, frame
  builders);
* :mod:`.metrics`: the instruments (synchronized clock, saved memory, σ and subspace errors, median);
* :mod:`.measurement`: the interleaved measurement of one case, as table rows;
* :mod:`.tables`: rows as text and markdown tables, and the targets they decide;
* :mod:`.command`: the command line.
"""
from .command import SUITES, main
from .measurement import measure_adapter, measure_frames, measure_penalty, measure_svd
from .methods import CHECKED_METHODS, METHOD_LABELS, METHODS, AdapterMethod, build_adapter_methods, check_outputs
from .shapes import (CPU_SPEED_TARGET, GPU_SPEED_TARGET, AdapterShape, FramesModel, PenaltyCase, SvdCase,
                     adapter_shapes, fast_mode, frames_models, penalty_cases, rounds_for, svd_cases)
from .spectral_methods import SVD_METHODS, FramesBench
from .tables import format_markdown, format_text, target_checks

__all__ = [
    "AdapterMethod", "AdapterShape", "CHECKED_METHODS", "CPU_SPEED_TARGET", "FramesBench", "FramesModel",
    "GPU_SPEED_TARGET", "METHODS", "METHOD_LABELS", "PenaltyCase", "SUITES", "SVD_METHODS", "SvdCase",
    "adapter_shapes", "build_adapter_methods", "check_outputs", "fast_mode", "format_markdown", "format_text",
    "frames_models", "main", "measure_adapter", "measure_frames", "measure_penalty", "measure_svd",
    "penalty_cases", "rounds_for", "svd_cases", "target_checks",
]
