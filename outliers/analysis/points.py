"""Where to look: the capture points of each architecture.

A capture point is the input of one linear layer (or a block's output, for the
residual stream), with the block it belongs to and the feature space it
lives in (Dettmers et al. 2022, §4.1; ``docs/protocols.md``):

``attn_in``   input of the q/k/v projections (they share it; hooked once, on q)  space "hidden"
``attn_out``  input of the attention output projection (concatenated heads)     space "heads"
``ffn_in``    input of the FFN expansion (up/gate, fc1, c_fc, intermediate)      space "hidden"
``down_in``   input of the MLP's output projection (down_proj, fc2, c_proj,       space "intermediate"
              dense_4h_to_h, output.dense): the MLP's hidden activation, as wide
              as the MLP. The massive activation a super weight multiplies is
              born here (Yu et al. 2024; DuQuant's "massive outliers"). Not a
              default point: asked for by name.
``residual``  a block's output, the residual stream                              space "residual"

Dims are pooled only within one space: dim i of the heads space is not dim i
of the hidden space, even where the sizes agree.

Where each kind is comes from the architecture registry
(``outliers.arch``: a suffix regex per kind, the block index as its first
group); pass ``patterns={kind: regex}`` to override it or to support a
family the registry does not know. Where a transform sits before a linear
(``outliers.quant.transforms.TransformedInput``), the point is the linear
inside it: what the quantizer sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from outliers.arch.linear import in_features
from outliers.arch.registry import architecture_of, linear_summary
from outliers.errors import InvalidArgumentError

__all__ = ["CapturePoint", "KINDS", "SPACES", "resolve_points", "parse_kinds"]

KINDS = ("attn_in", "attn_out", "ffn_in", "down_in", "residual")
SPACES = {
    "attn_in": "hidden",
    "attn_out": "heads",
    "ffn_in": "hidden",
    "down_in": "intermediate",
    "residual": "residual",
}
SHORTHANDS = {
    "attn": ("attn_in", "attn_out"),
    "ffn": ("ffn_in",),
    "residual": ("residual",),
    **{k: (k,) for k in KINDS},
}


@dataclass(frozen=True)
class CapturePoint:
    """One place whose hidden states are measured."""

    name: str  # "L03.attn_in": block and kind, sortable
    module: str  # the hooked module's path in the model
    layer: int
    kind: str
    space: str
    dims: int


def parse_kinds(points: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Return kinds from ``"attn,ffn,residual"`` or a list of kinds/shorthands."""
    items = points.split(",") if isinstance(points, str) else list(points)
    kinds: list[str] = []
    for item in (i.strip() for i in items):
        if item not in SHORTHANDS:
            raise InvalidArgumentError(f"unknown capture point {item!r}; choose from {', '.join(SHORTHANDS)}")
        kinds += [k for k in SHORTHANDS[item] if k not in kinds]
    if not kinds:
        raise InvalidArgumentError("no capture points asked for; e.g. --points attn,ffn")
    return tuple(kinds)


def resolve_points(
    model: nn.Module,
    kinds: tuple[str, ...] | str = ("attn_in", "attn_out", "ffn_in"),
    patterns: dict[str, str] | None = None,
) -> list[CapturePoint]:
    """Return the model's capture points of the given kinds, in block order.

    Raises:
        InvalidArgumentError: a family the registry does not know (the
            message lists the linear modules found), a pattern that matches
            nothing, or an empty selection.
    """
    kinds = parse_kinds(kinds) if isinstance(kinds, str) else parse_kinds(tuple(kinds))
    config = getattr(model, "config", None)
    family = architecture_of(model)
    arch = getattr(config, "model_type", type(model).__name__)
    table = family.capture_patterns() | dict(patterns or {})
    missing = [k for k in kinds if k not in table]
    if missing:
        raise InvalidArgumentError(
            f"no capture-point patterns for architecture {arch!r} (kinds {', '.join(missing)}); "
            f"its linear modules are: {linear_summary(model)}. Pass patterns={{kind: regex}} "
            r"with the block index as the first group, e.g. {'attn_in': r'layers\.(\d+)\.attn\.q'}"
        )
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    points: list[CapturePoint] = []
    modules = list(model.named_modules())
    for kind in kinds:
        rx = re.compile(r"(?:^|\.)" + table[kind] + "$")
        found = 0
        for name, module in modules:
            m = rx.search(name)
            if not m:
                continue
            if kind != "residual" and hasattr(module, "linear") and hasattr(module, "op"):
                # a transform before the linear (outliers.quant.transforms): measure what the linear reads
                name, module = f"{name}.linear", module.linear
            # a quantized layer (Int8Linear and kin) says its own in_features
            dims = hidden if kind == "residual" else (in_features(module) or getattr(module, "in_features", None))
            if dims is None:
                raise InvalidArgumentError(f"capture point {name} ({kind}) is not a linear layer")
            layer = int(m.group(1))
            points.append(CapturePoint(f"L{layer:02d}.{kind}", name, layer, kind, SPACES[kind], int(dims)))
            found += 1
        if not found:
            raise InvalidArgumentError(
                f"pattern {table[kind]!r} for {kind} matches no module of {arch!r}; "
                f"its linear modules are: {linear_summary(model)}"
            )
    return sorted(points, key=lambda p: (p.layer, KINDS.index(p.kind)))
