"""The exception the launchers raise for arguments they refuse.

``cuda_kernels`` stands alone (it imports numba, numpy and torch, nothing else), so it
has its own exception. It derives from ``ValueError``: code that catches ``ValueError``
catches it, whatever package calls the kernels.
"""

__all__ = ["KernelArgumentError"]


class KernelArgumentError(ValueError):
    """A tensor on the wrong device, of the wrong dtype, rank or layout, shapes that do not fit,
    a value out of range (a negative threshold, an unknown ``gemm``), or an invalid ``TileConfig``."""
