"""taillor: continual fine-tuning with TailLoR — low-rank updates learned in the SVD frame of each frozen weight,
kept out of its dominant singular directions by a soft spectral penalty.

See README.md for the workflow; the normative math is in the docstrings of :mod:`taillor.functional` and
:mod:`taillor.eager`.
"""
from . import continual
from ._version import __version__
from .backends import use_backend
from .config import TailLoRConfig
from .frame import SpectralFrame, clear_frame_cache
from .functional import randomized_svd, spectral_projection, taillor_linear
from .info import info
from .io import AdapterFileError, export_lora, load_adapter, save_adapter
from .layer import TailLoRLinear
from .penalty_hook import PenaltyHandle, attach_penalty
from .model import (apply_taillor, build_frames, consolidate, estimate_apply_memory, estimate_frame_bytes,
                    find_target_modules, iter_taillor_layers, merge_and_requantize, merge_and_unload,
                    spectral_penalty, trainable_parameters)
from .report import spectral_report

__all__ = [
    "__version__", "AdapterFileError", "PenaltyHandle", "TailLoRConfig", "TailLoRLinear", "SpectralFrame", "apply_taillor",
    "attach_penalty", "build_frames", "clear_frame_cache", "consolidate", "continual", "estimate_apply_memory",
    "estimate_frame_bytes", "export_lora", "find_target_modules", "info", "iter_taillor_layers", "load_adapter",
    "merge_and_requantize", "merge_and_unload", "randomized_svd", "save_adapter", "spectral_penalty",
    "spectral_projection", "spectral_report", "taillor_linear", "trainable_parameters", "use_backend",
]
