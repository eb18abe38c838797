"""Test code shared by the super-weight test modules: a tiny model with a planted super weight, seeded ids, and
snapshots to check that a model comes back bit-identical (test modules import from here, never from one another)."""

from __future__ import annotations

import torch
from helpers import make_model

from outliers.analysis.superweights import down_projections
from outliers.arch.linear import weight_of

W = 32
BLOCK, ROW, COL = 1, 5, 9  # the planted super weight: W[ROW, COL] of block 1's down projection


def ids(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed))


def planted(arch: str = "llama", layers: int = 4) -> torch.nn.Module:
    """Block 1's hidden unit COL is large wherever its gate is open (its up/gate rows or c_fc column x 20), and
    W[ROW, COL] = 50 is the only weight that reads it: the down projection's output spikes in ROW."""
    model = make_model(arch, layers=layers)
    mlp = down_projections(model)[BLOCK][1]
    with torch.no_grad():
        if arch == "llama":
            block = model.model.layers[BLOCK].mlp
            block.up_proj.weight[COL] *= 20
            block.gate_proj.weight[COL] *= 20
        else:  # GPT-2's c_fc is a Conv1D, weight (in, out)
            model.transformer.h[BLOCK].mlp.c_fc.weight[:, COL] *= 20
        w = weight_of(mlp)  # (out, in), a view for Conv1D
        w[:, COL] = 0
        w[ROW, COL] = 50.0
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
