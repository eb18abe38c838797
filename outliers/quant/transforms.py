"""Transforms that remove outliers before quantizing: SmoothQuant smoothing and Hadamard rotation.

Both leave the float model's function unchanged and change what the
quantizer sees; both compose with every quantization method (apply them to a
float model, then ``quantize_model``).

**Smoothing** (Xiao et al. 2022, "SmoothQuant", arXiv 2211.10438): per input
channel j of a group of linears that read one input (q/k/v; up/gate; the
attention output projection; the down projection),
s_j = max|X_j|^α / max|W_j|^(1-α), where max|X_j| comes from calibration
windows and max|W_j| runs over column j of every linear in the group. Column
j of each weight is multiplied by s_j, and X/s is folded into the norm before
the group where the architecture registry says how (``outliers.arch.norms``);
otherwise a ``ChannelScale`` module divides the input on the fly.

**Rotation** (QuaRot, Ashkboos et al. 2024, arXiv 2404.00456): each
quantized linear's input is multiplied by Q = diag(signs)·H/√n, an
orthogonal Hadamard matrix with seeded random signs applied first (QuaRot's
order: the seed changes which mixtures an outlier spreads into; with the
signs after H they would only flip the signs of the rotated columns of x and
W together, which no symmetric quantizer sees), and its weight by Q
(W ← W Q, so (x Q)(W Q)ᵀ = x Wᵀ). H = H_m ⊗ H_{2^k} is a true Hadamard
matrix of the full size (``outliers.quant.hadamard``), applied with its
Kronecker structure: n·(a + b) multiply-adds per token instead of n²
(``hadamard.kronecker_factors``).
No earlier weight absorbs the input's rotation here (QuaRot's full scheme
rotates the residual stream itself), so it is an online cost:
``benchmarks/eval_speed.py`` measures it. Linears that read one input share
one online op (``Shared``), computed once per forward. Half-precision inputs
are scaled and rotated in float32: a bf16 copy of 1/24 is off by 0.2 %, a bias.

Either online step sits in a ``TransformedInput`` at the linear's place:
``.op`` then ``.linear``, so capture hooks on ``.linear`` see what the
quantizer sees (``outliers.analysis.points`` looks through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from outliers.arch.linear import in_features, is_linear, weight_of
from outliers.arch.norms import fold_inverse_scale
from outliers.arch.registry import NormKind, architecture_of, blocks, is_skipped
from outliers.errors import InvalidArgumentError
from outliers.quant.transform_spec import ROTATIONS, Transform, parse_row, row_name  # re-exported

__all__ = [
    "ROTATIONS",
    "Transform",
    "row_name",
    "parse_row",
    "Group",
    "ChannelScale",
    "Rotation",
    "Shared",
    "TransformedInput",
    "input_groups",
    "smoothing_scales",
    "smooth",
    "rotate",
]


@dataclass(frozen=True)
class Group:
    """Linears that read one input, and the norm that makes it (None: a ``ChannelScale`` divides it)."""

    name: str  # "L03.attn_in"
    linears: tuple[str, ...]  # module paths
    norm: str | None = None
    norm_kind: NormKind | None = None


def input_groups(model: nn.Module, skip: tuple[str, ...] | None = None) -> list[Group]:
    """Return the model's quantizable linears grouped by input, from the architecture registry.

    Every linear outside ``skip`` (the architecture's: ``lm_head``) is in
    exactly one group; those the registry does not place are a group each.
    """
    arch = architecture_of(model)
    skip = arch.skip if skip is None else skip
    linears = [n for n in _linear_paths(model) if not is_skipped(n, skip)]
    groups: list[Group] = []
    if arch.blocks is not None:
        for i, path, _ in blocks(model, arch):
            at = lambda p, path=path: f"{path}.{p}"  # noqa: E731
            for kind, shared in (("attn_in", arch.attn_in), ("ffn_in", arch.ffn_in)):
                if shared is not None:
                    names = tuple(at(p) for p in shared.linears if at(p) in linears)
                    norm = at(shared.norm) if shared.norm else None
                    groups.append(Group(f"L{i:02d}.{kind}", names, norm, shared.norm_kind if norm else None))
            for kind, single in (("attn_out", arch.attn_out), ("down", arch.down)):
                if single is not None and at(single) in linears:
                    groups.append(Group(f"L{i:02d}.{kind}", (at(single),)))
    groups = [g for g in groups if g.linears]
    placed = {n for g in groups for n in g.linears}
    groups += [Group(n, (n,)) for n in linears if n not in placed]
    return groups


def _linear_paths(model: nn.Module) -> list[str]:
    """The paths of the model's linears, a transformed one at its wrapper's path (where it was)."""
    modules = dict(model.named_modules())
    wrapped = {f"{n}.linear" for n, m in modules.items() if isinstance(m, TransformedInput)}
    return [
        n
        for n, m in modules.items()
        if n and n not in wrapped and (isinstance(m, TransformedInput) or (is_linear(m) and not _inside(n, wrapped)))
    ]


def _inside(name: str, wrapped: set[str]) -> bool:
    return any(name.startswith(w + ".") for w in wrapped)


def _at_least_float32(x: torch.Tensor) -> torch.dtype:
    # a half-precision copy of 1/s or of ±1/sqrt(n) is off by up to 2^-9: a bias, not a rounding
    return torch.promote_types(x.dtype, torch.float32)


class ChannelScale(nn.Module):
    """x / s per channel: smoothing where no norm can absorb it."""

    inv_s: torch.Tensor

    def __init__(self, s: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_s", 1 / s.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _at_least_float32(x)
        return (x.to(dt) * self.inv_s.to(dt)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.inv_s.numel()}"


class Rotation(nn.Module):
    """x ↦ x Q with Q = diag(signs)·(H_a ⊗ H_b)/√n, applied through the Kronecker structure, never built."""

    h_a: torch.Tensor
    h_b: torch.Tensor
    signs: torch.Tensor

    def __init__(self, n: int, seed: int):
        super().__init__()
        from outliers.quant.hadamard import kronecker_factors

        h_a, h_b, self.construction = kronecker_factors(n)
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        self.register_buffer("h_a", h_a.float())
        self.register_buffer("h_b", h_b.float())
        self.register_buffer("signs", signs.double() / n**0.5)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Q, computed in float32 at least (float64 for float64 x: weights are rotated so)."""
        dt = _at_least_float32(x)
        a, b = self.h_a.shape[0], self.h_b.shape[0]
        h_a, h_b, signs = (t.to(dt) for t in (self.h_a, self.h_b, self.signs))
        y = h_a.t() @ (x.to(dt) * signs).reshape(*x.shape[:-1], a, b) @ h_b  # (x diag(signs)) (H_a ⊗ H_b)
        return y.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, H={self.construction}"


class Shared(nn.Module):
    """``op`` for the ``readers`` linears of one input: the first computes, the others take the same result
    for the same input tensor, and no activation is kept once the last has read it."""

    def __init__(self, op: nn.Module, readers: int):
        super().__init__()
        self.op, self.readers = op, readers
        self._memo: tuple[torch.Tensor, int, torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        version = 0 if x.is_inference() else x._version  # inference tensors keep no version counter
        memo = self._memo
        if memo is not None and memo[0] is x and memo[1] == version:  # the same tensor, unchanged
            _, _, y, left = memo
            self._memo = (x, version, y, left - 1) if left > 1 else None
            return y
        y = self.op(x)
        self._memo = (x, version, y, self.readers - 1) if self.readers > 1 else None
        return y

    def extra_repr(self) -> str:
        return f"readers={self.readers}"


class TransformedInput(nn.Module):
    """``linear(op(x))``: an online input transform at a linear's place (``.linear`` is the linear itself)."""

    def __init__(self, op: nn.Module, linear: nn.Module):
        super().__init__()
        self.op, self.linear = op, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.op(x))


def _place(model: nn.Module, names: tuple[str, ...], op: nn.Module) -> None:
    """Put ``op`` before the linears at ``names`` (one input's readers), after any op already there; the
    readers share one composed op, computed once per forward."""
    first = model.get_submodule(names[0])
    if isinstance(first, TransformedInput):
        before = first.op.op if isinstance(first.op, Shared) else first.op
        op = nn.Sequential(before, op)
    shared = Shared(op, len(names)) if len(names) > 1 else op
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        current = getattr(owner, child)
        if isinstance(current, TransformedInput):
            current.op = shared
        else:
            setattr(owner, child, TransformedInput(shared, current))


def _linear(model: nn.Module, name: str) -> nn.Module:
    m = model.get_submodule(name)
    return m.linear if isinstance(m, TransformedInput) else m


def smoothing_scales(model: nn.Module, act_max: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Return s per group name: max|X_j|^α / max|W_j|^(1-α), both clamped at 1e-5 (SmoothQuant's floor).

    ``act_max`` maps a group name to its input's per-channel max |x| (``calibrate``).
    """
    out = {}
    for g in input_groups(model):
        if g.name not in act_max:
            raise InvalidArgumentError(f"no calibration statistics for {g.name} ({', '.join(g.linears)})")
        w_max = torch.stack([weight_of(_linear(model, n)).detach().abs().amax(0).float() for n in g.linears]).amax(0)
        a = act_max[g.name].float().clamp_min(1e-5)
        out[g.name] = (a.pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
    return out


@torch.no_grad()
def smooth(model: nn.Module, scales: dict[str, torch.Tensor]) -> dict[str, str]:
    """Apply ``smoothing_scales`` in place; return per group where X/s went: the norm's path or "module"."""
    where = {}
    for g in input_groups(model):
        s = scales[g.name].to(next(model.parameters()).device)
        for n in g.linears:
            w = weight_of(_linear(model, n))
            w.mul_(s.to(w.dtype))  # column j times s_j
        if g.norm is not None and g.norm_kind is not None:
            fold_inverse_scale(model.get_submodule(g.norm), g.norm_kind, s)
            where[g.name] = g.norm
        else:
            _place(model, g.linears, ChannelScale(s))
            where[g.name] = "module"
    return where


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0) -> dict[str, str]:
    """Rotate every quantizable linear's input and weight in place; return each group's Hadamard construction.

    Raises:
        InvalidArgumentError: an input size with no known full-size Hadamard matrix.
    """
    out = {}
    for k, g in enumerate(input_groups(model)):
        n = in_features(_linear(model, g.linears[0]))
        if n is None:
            raise InvalidArgumentError(f"{g.linears[0]} is not a linear layer")
        rot = Rotation(n, seed + k).to(next(model.parameters()).device)
        for name in g.linears:
            w = weight_of(_linear(model, name))
            w.copy_(rot(w.double()).to(w.dtype))  # W Q in float64: rows of W rotate as inputs do
        _place(model, g.linears, rot)
        out[g.name] = rot.construction
    return out


# ---------------------------------------------------------------- row names: a method after a transform

__all__ += ["row_name", "parse_row"]
