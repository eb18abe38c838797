"""Load a model by name, folder, GGUF file or hub id: ``load_model(spec)``.

Built-in names map to models that ship inside PyPI packages
(``outliers.models.builtin``), so everything here works offline; GGUF files
go through a cached float conversion (``outliers.models.gguf``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from outliers.cache import heal, sha256_file
from outliers.errors import HubUnavailableError, InvalidArgumentError, ModelFileError
from outliers.models.builtin import DEFAULT_MODEL
from outliers.models.dispatch import DeviceMap, check_offload, describe_placement, offload_subfolder, remove_with
from outliers.models.dtypes import dtype_name
from outliers.models.gguf import check_gguf, convert_gguf, quiet_loading
from outliers.models.hub import hub_kwargs
from outliers.models.source import identity, provenance, resolve

__all__ = ["ModelInfo", "LoadedModel", "load_model", "parse_dtype", "model_name"]


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


def model_name(model: torch.nn.Module) -> str:
    """The name ``load_model`` gave the model (the built-in name, folder or file asked for); else transformers'
    ``name_or_path``; else ''."""
    return str(getattr(model, "outliers_name", "") or getattr(model, "name_or_path", ""))


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for ``"float32"``, ``"fp32"``, ``"bf16"``, ... or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _placement(auto: Any, config: Any, dtype: torch.dtype, device_map, max_memory, offload_folder) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments: the map planned on an empty (meta) model and checked first.

    Planning here, not in transformers, gives one set of errors for both ways
    of dispatching, and refuses float16 compute on a CPU-only map as ``device`` does.
    """
    from outliers.models.dispatch import plan_device_map

    # torch's meta device, not accelerate's init_empty_weights: with transformers 5 the latter leaves GPT-2's
    # and OPT's tied lm_head untied, and the plan would count it twice
    with torch.device("meta"):
        skeleton = auto.from_config(config, dtype=dtype)
    plan = plan_device_map(skeleton, device_map, max_memory=max_memory, dtype=dtype)
    if dtype == torch.float16 and set(plan.values()) <= {"cpu", "disk"}:
        raise InvalidArgumentError("dtype float16 on a map without GPUs is refused: use float32 or bfloat16")
    check_offload(plan, offload_folder)
    out: dict[str, Any] = {"device_map": plan, "offload_buffers": True}
    if "disk" in plan.values():
        assert offload_folder is not None  # check_offload
        out["offload_folder"] = offload_subfolder(offload_folder)
    return out


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    cache: bool = True,
    progress: bool = True,
    device_map: DeviceMap | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
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
        device_map: spread the model over devices instead of ``device``: a
            strategy (``"auto"``: the GPUs found, then CPU, then disk) or a dict
            of module -> device (``outliers.models.dispatch``). Weights stream
            from the files to their devices; to quantize, load without it and
            use ``quantize_model`` then ``dispatch``.
        max_memory: per-device budget for a strategy, e.g. ``{0: "20GiB", "cpu": "64GiB"}``.
        offload_folder: where ``"disk"`` blocks go (a fresh folder inside it,
            removed with the model).

    Raises:
        UnknownModelError, MissingPackageError, ModelFileError,
        HubUnavailableError, InvalidArgumentError.
    """
    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device_map is not None and device.type != "cpu":
        raise InvalidArgumentError(f"give a device ({device}) or a device_map, not both")
    if torch_dtype == torch.float16 and device.type == "cpu" and device_map is None:
        raise InvalidArgumentError(
            "dtype float16 on CPU is refused: CPU fp16 matmul is ~100x slower than fp32; "
            "use float32 or bfloat16, or a CUDA device"
        )
    src = resolve(spec)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    gguf_file = None
    where: str | Path
    if src.gguf is not None:
        if cache:
            sha = src.gguf_sha256 or sha256_file(src.gguf)
            where = convert_gguf(src.gguf, sha, progress=progress)
        else:
            check_gguf(src.gguf)
            where, gguf_file = src.gguf.parent, src.gguf.name
            kwargs["gguf_file"] = gguf_file
    elif src.folder is not None:
        where = src.folder
        if not (where / "config.json").exists():
            raise ModelFileError(f"folder {where} has no config.json: not a Hugging Face model folder")
    else:
        assert src.hub_id is not None  # resolve() sets exactly one of gguf, folder, hub_id
        where = src.hub_id
        kwargs.update(hub_kwargs(src.hub_id))

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    def read(where: str | Path) -> tuple[Any, Any, Any, bool]:
        with quiet_loading(progress=progress, gguf=gguf_file is not None), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            cfg_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only")}
            config = AutoConfig.from_pretrained(where, **cfg_kwargs)
            causal = _is_causal(config)
            auto = AutoModelForCausalLM if causal else AutoModel
            if device_map is not None:
                kwargs.update(_placement(auto, config, torch_dtype, device_map, max_memory, offload_folder))
            model = auto.from_pretrained(where, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, **cfg_kwargs)
        return config, model, tokenizer, causal

    try:
        try:
            config, model, tokenizer, causal = read(where)
        except (HubUnavailableError, InvalidArgumentError):
            raise
        except Exception as e:
            if src.gguf is None or not cache:
                raise
            # our own conversion failed to load: it is a cache, so it is rebuilt from the GGUF once
            heal(where, e)
            where = convert_gguf(src.gguf, sha, progress=progress)
            config, model, tokenizer, causal = read(where)
    except (HubUnavailableError, InvalidArgumentError):
        raise
    except Exception as e:
        raise ModelFileError(f"could not load model '{spec}' from {where}: {e}") from e
    placed = model.eval().requires_grad_(False)
    plan = getattr(model, "hf_device_map", None) if device_map is not None else None
    if plan is None:  # a dispatched model stays where accelerate put it
        placed.to(device)
    elif "offload_folder" in kwargs:
        remove_with(model, kwargs["offload_folder"])
    config = model.config
    ident = identity(src)
    if ident["format"] == "hub" and ident["revision"] is None:  # downloaded just now
        ident = identity(src)
    torch_dtype_name = str(torch_dtype).removeprefix("torch.")
    info = ModelInfo(
        name=spec,
        source=str(src.gguf or where),
        kind="causal" if causal else "encoder",
        architecture=config.model_type,
        model_class=type(model).__name__,
        n_params=sum(p.numel() for p in model.parameters()),
        dtype=torch_dtype_name,
        device=str(device) if plan is None else describe_placement(plan),
        hidden_size=getattr(config, "hidden_size", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        vocab_size=getattr(config, "vocab_size", None),
        weights=provenance(ident, torch_dtype_name),
        weights_sha256=ident["sha256"],
        revision=ident["revision"] or getattr(config, "_commit_hash", None),
    )
    model.outliers_name = info.name  # what results call it downstream: the name asked for, not a cache path
    return LoadedModel(model, tokenizer, info)
