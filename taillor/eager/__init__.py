"""Eager PyTorch kernels: the default implementation of every taillor op, on every device.

Each module mirrors a Triton kernel module of the same stem in ``kernels/`` (same launcher signature), so the
dispatcher in :mod:`taillor.ops` can pick either per device. These are the float64 oracle's closest neighbours:
plain matmuls with no fusion.
"""
