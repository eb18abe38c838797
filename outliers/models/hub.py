"""The Hugging Face hub, for users who have one: fail within seconds, with a clear message, where there is none."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from outliers.errors import HubUnavailableError

__all__ = ["hub_reachable", "hub_unreachable", "hub_kwargs", "hub_snapshot"]


def hub_snapshot(hub_id: str) -> Path | None:
    """Return the local Hugging Face cache's snapshot folder of ``hub_id``, or None if it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), no huggingface_hub, a bad id...
        return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Return why the hub cannot be reached from here (``HF_HUB_OFFLINE`` set, no answer), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname}:{port} not reached within {timeout:g} s: {e.strerror or e}"


def hub_reachable(timeout: float = 3.0) -> bool:
    return hub_unreachable(timeout) is None


def hub_kwargs(hub_id: str) -> dict[str, Any]:
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
    if not hub_reachable():
        raise HubUnavailableError(
            f"cannot load hub model '{hub_id}': the hub is not reachable from here and the "
            "model is not in the local Hugging Face cache; pass a local folder or a .gguf file"
        )
    return {}
