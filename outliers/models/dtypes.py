"""The dtype names the toolkit takes (``--dtype``, a study's ``dtype``), checked without importing torch."""

from __future__ import annotations

from outliers.errors import InvalidArgumentError

__all__ = ["DTYPE_NAMES", "dtype_name"]

DTYPE_NAMES = {  # what a user may write -> torch's name for it
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def dtype_name(dtype: str) -> str:
    """Return torch's name (``"bfloat16"``) for a dtype as written (``"bf16"``).

    Raises:
        InvalidArgumentError: a name not in ``DTYPE_NAMES``.
    """
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}") from None
