"""Key-value cache formats as named: ``int4-kivi``, ``int8-token``, ``int2-channel-g64``; no torch needed.

A format is bits (8, 4 or 2), a granularity (``token``: keys and values per token; ``channel``: both per channel
over groups of G tokens; ``kivi``: keys per channel, values per token, KIVI's pairing) and the group G (default
32). ``KVQuant`` adds the tokens kept in float and the Hadamard rotation. What they do:
``outliers.quant.kv_cache``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from outliers.errors import InvalidArgumentError

__all__ = ["BITS", "MODES", "DEFAULT_GROUP", "KVCacheSpec", "KVQuant", "parse_kv_spec", "parse_kv_specs"]

BITS = (8, 4, 2)
MODES = {"token": ("token", "token"), "channel": ("channel", "channel"), "kivi": ("channel", "token")}
DEFAULT_GROUP = 32  # KIVI's group size (its paper runs 32 and 128)
_SPEC = re.compile(r"int(?P<bits>\d+)-(?P<mode>[a-z]+)(?:-g(?P<group>\S*))?")
_SPELLING = "int8|int4|int2 then token|channel|kivi, then -gG for channel and kivi (int4-kivi, int2-channel-g64)"


@dataclass(frozen=True)
class KVCacheSpec:
    """One cache format: ``bits``; ``mode`` token, channel or kivi; ``group`` tokens per channel group (None for
    token, where nothing is grouped over tokens)."""

    bits: int
    mode: str
    group: int | None = None

    @property
    def keys(self) -> str:
        return MODES[self.mode][0]

    @property
    def values(self) -> str:
        return MODES[self.mode][1]

    @property
    def name(self) -> str:
        """The canonical spelling: the default group is left out (``int4-kivi``, ``int2-channel-g64``)."""
        g = f"-g{self.group}" if self.group not in (None, DEFAULT_GROUP) else ""
        return f"int{self.bits}-{self.mode}{g}"

    @property
    def label(self) -> str:
        what = {"token": "per token", "channel": "per channel", "kivi": "KIVI"}[self.mode]
        return f"int{self.bits} {what}" + (f" (g{self.group})" if self.group else "")


def parse_kv_spec(text: str) -> KVCacheSpec:
    """``int4-kivi`` -> ``KVCacheSpec(4, "kivi", 32)``.

    Raises:
        InvalidArgumentError: anything else than the spelling, bits other than 8/4/2, a group on ``token``,
            a group that is not a positive integer.
    """
    s = text.strip()
    m = _SPEC.fullmatch(s)
    if m is None:
        raise InvalidArgumentError(f"--kv-cache {s!r}: spell it {_SPELLING}")
    bits, mode, group = int(m["bits"]), m["mode"], m["group"]
    if bits not in BITS:
        raise InvalidArgumentError(f"--kv-cache {s!r}: int{bits} is not offered; choose int8, int4 or int2")
    if mode not in MODES:
        raise InvalidArgumentError(f"--kv-cache {s!r}: unknown granularity {mode!r}; choose token, channel or kivi")
    if group is not None and mode == "token":
        raise InvalidArgumentError(f"--kv-cache {s!r}: per-token scales have no token groups; drop -g{group}")
    if group is not None and not (group.isdigit() and int(group) > 0):
        raise InvalidArgumentError(f"--kv-cache {s!r}: the group -g{group} must be a positive number of tokens")
    return KVCacheSpec(bits, mode, None if mode == "token" else int(group) if group else DEFAULT_GROUP)


def parse_kv_specs(text: str) -> list[KVCacheSpec]:
    """A comma list of specs, in order, each once.

    Raises:
        InvalidArgumentError: an empty list, a bad spec, or one named twice.
    """
    specs = [parse_kv_spec(s) for s in text.split(",") if s.strip()]
    if not specs:
        raise InvalidArgumentError(f"--kv-cache names no cache format; spell each {_SPELLING}")
    if len({s.name for s in specs}) < len(specs):
        raise InvalidArgumentError(f"--kv-cache {text!r} names a format twice")
    return specs


@dataclass(frozen=True)
class KVQuant:
    """A cache format with its kept tokens and rotation: what one row quantizes the cache as."""

    spec: KVCacheSpec
    keep: int = 0
    rotate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise InvalidArgumentError(f"--kv-keep must be a whole number of tokens >= 0, got {self.keep!r}")

    @property
    def label(self) -> str:
        """``KV cache int4 KIVI (g32), 4 sinks kept``."""
        kept = f", {self.keep} sink{'s' if self.keep != 1 else ''} kept" if self.keep else ""
        return f"KV cache {self.spec.label}{kept}" + (", Hadamard-rotated" if self.rotate else "")

    def facts(self) -> dict[str, Any]:
        """What a result records of it (its ``extra``)."""
        return {
            "kv_cache": self.spec.name,
            "kv_bits": self.spec.bits,
            "kv_keys": self.spec.keys,
            "kv_values": self.spec.values,
            "kv_group": self.spec.group,
            "kv_keep": self.keep,
            "kv_rotate": self.rotate,
            "kv_scheme": "asymmetric min-max",
        }
