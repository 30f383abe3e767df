"""Python-source corpus for the shipped models, with a deterministic file-level held-out split.

The corpus is whatever Python source the running interpreter can see: its standard library (test suite
included) and the pure-Python files of installed packages. Each top-level package is capped so that one
huge package (transformers, torch) cannot drown out the rest; files are taken in sorted order so the same
installation always yields the same corpus. The split hashes a file's *name* (not its content), so a file is
held out on every machine that has it, and the bench tasks can be built from held-out files only.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HELD_OUT_PERCENT = 2  # 1 file in 50 is held out; enough for a loss estimate and the bench task files


@dataclass(frozen=True)
class SourceFile:
    name: str  # "stdlib/json/decoder.py" or "site-packages/numpy/linalg/linalg.py": stable across machines
    path: Path

    @property
    def held_out(self) -> bool:
        return is_held_out(self.name)


def is_held_out(name: str) -> bool:
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


@dataclass
class CorpusConfig:
    max_file_bytes: int = 400_000  # generated tables and vendored blobs teach nothing about code
    min_file_bytes: int = 200
    max_package_bytes: int = 8_000_000  # per top-level package (the stdlib counts as many packages)
    include_site_packages: bool = True
    roots: dict[str, str] = field(default_factory=dict)  # label -> directory; default: stdlib + purelib


def default_roots(include_site_packages: bool = True) -> dict[str, str]:
    paths = sysconfig.get_paths()
    roots = {"stdlib": paths["stdlib"]}
    if include_site_packages:
        roots["site-packages"] = paths["purelib"]
    return roots


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def collect_files(config: CorpusConfig) -> list[SourceFile]:
    """All eligible files, sorted by name, with per-package caps and exact-duplicate removal."""
    roots = config.roots or default_roots(config.include_site_packages)
    site = roots.get("site-packages")
    candidates: list[SourceFile] = []
    for label, root in roots.items():
        base = Path(root)
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).as_posix()
            if label == "stdlib" and site and str(path).startswith(site):
                continue  # site-packages lives inside the stdlib directory
            if not path.is_file() or path.is_symlink():
                continue
            candidates.append(SourceFile(f"{label}/{rel}", path))
    candidates.sort(key=lambda f: f.name)

    seen: set[bytes] = set()
    used_per_package: dict[str, int] = {}
    chosen: list[SourceFile] = []
    for f in candidates:
        size = f.path.stat().st_size
        if not config.min_file_bytes <= size <= config.max_file_bytes:
            continue
        package = "/".join(f.name.split("/")[:2])
        if used_per_package.get(package, 0) + size > config.max_package_bytes:
            continue
        text = _read_text(f.path)
        if text is None:
            continue
        digest = hashlib.sha1(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        used_per_package[package] = used_per_package.get(package, 0) + size
        chosen.append(f)
    return chosen


def iter_texts(files: list[SourceFile]) -> Iterator[str]:
    for f in files:
        text = _read_text(f.path)
        if text is not None:
            yield text


def write_manifest(files: list[SourceFile], out: Path) -> dict:
    """Record exactly what went in: per-package file and byte counts, and the held-out file names."""
    packages: dict[str, dict[str, int]] = {}
    held_out = []
    for f in files:
        package = "/".join(f.name.split("/")[:2])
        entry = packages.setdefault(package, {"files": 0, "bytes": 0, "held_out_files": 0})
        entry["files"] += 1
        entry["bytes"] += f.path.stat().st_size
        if f.held_out:
            entry["held_out_files"] += 1
            held_out.append(f.name)
    manifest = {
        "held_out_rule": f"sha1(name)[:4] as big-endian int % 100 < {HELD_OUT_PERCENT}",
        "files": len(files),
        "bytes": sum(p["bytes"] for p in packages.values()),
        "packages": packages,
        "held_out_files": held_out,
    }
    out.write_text(json.dumps(manifest, indent=1))
    return manifest
