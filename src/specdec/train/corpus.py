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
# never trained on in a strict corpus (`CorpusConfig.strict`): held-out evaluation draws its prompts from them,
# besides every package the bench suites take a file from (`bench_packages`)
EXCLUDED_PACKAGES = frozenset(
    [
        "toolz",
        "tlz",
        "more_itertools",
        "tabulate",
        "humanize",
        "boltons",
        "bidict",
        "cachetools",
        "tenacity",
        "cerberus",
        "voluptuous",
        "sqlparse",
        "tomlkit",
        "marshmallow",
        "invoke",
        "mistune",
        "markdown",
        "arrow",
        "pendulum",
        "inflect",
        "docopt",
        "plumbum",
        "schema",
        "pyrsistent",
        "html5lib",
        "bleach",
        "furl",
        "yarl",
        "multidict",
        "babel",
        "pytz",
        "chardet",
        "feedparser",
        "simplejson",
        "cattrs",
        "termcolor",
        "sh",
    ]
)
# license texts a strict corpus takes (lower case, as substrings); a copyleft one anywhere in it refuses
PERMISSIVE = (
    "mit",
    "bsd",
    "apache",
    "isc",
    "psf",
    "python software foundation",
    "python-2.0",
    "unlicense",
    "zlib",
    "cc0",
    "hpnd",
)
COPYLEFT = ("gpl", "mpl", "mozilla", "eupl", "cddl", "epl", "eclipse", "proprietary", "commercial")


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
    # the accelerator run's corpus: a package outside the stdlib goes in only with a permissive license in its
    # metadata, and never one of EXCLUDED_PACKAGES or the bench's (`bench_packages`)
    strict: bool = False


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
    if config.strict:
        candidates = [f for f in candidates if admitted(f.name, roots)]

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


def top_level(name: str) -> str:
    """ "site-packages/numpy/linalg/x.py" -> "numpy" (a module file's stem, for a top-level module)."""
    parts = name.split("/")
    return parts[1].removesuffix(".py") if len(parts) > 1 else parts[0]


def permissive(license_text: str) -> bool:
    text = license_text.lower()
    return any(p in text for p in PERMISSIVE) and not any(c in text for c in COPYLEFT)


def package_licenses(root: str) -> dict[str, str]:
    """top-level package -> its distribution's license (License-Expression, else the License classifiers,
    else the License field), from the *.dist-info metadata under `root`."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in metadata.distributions(path=[root]):
        meta = dist.metadata
        classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        license_text = meta["License-Expression"] or "; ".join(classifiers) or meta["License"] or ""
        names = (dist.read_text("top_level.txt") or "").split()
        if not names:
            names = sorted(
                {str(f).split("/")[0].removesuffix(".py") for f in dist.files or [] if str(f).endswith(".py")}
            )
        for name in names:
            out.setdefault(name, license_text)
    return out


def bench_packages() -> frozenset[str]:
    """The top-level packages the bench suites take their prompts from (held out of a strict corpus)."""
    from importlib import resources

    names = set()
    for path in (resources.files("specdec.bench") / "tasks").iterdir():
        if path.name.endswith(".jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines():
                source = json.loads(line).get("source", "") if line.strip() else ""
                if source.startswith("site-packages/"):
                    names.add(top_level(source))
    return frozenset(names)


_LICENSES: dict[str, dict[str, str]] = {}


def admitted(name: str, roots: dict[str, str]) -> bool:
    """A file of a strict corpus: from the stdlib (PSF), or from a permissively licensed package that no
    held-out evaluation uses."""
    label = name.split("/")[0]
    if label == "stdlib":
        return True
    package = top_level(name)
    if package in EXCLUDED_PACKAGES or package in bench_packages():
        return False
    root = roots.get(label, "")
    if root not in _LICENSES:
        _LICENSES[root] = package_licenses(root)
    return permissive(_LICENSES[root].get(package, ""))


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
    licenses = {
        package: next(
            (lic[package.split("/")[1]] for lic in _LICENSES.values() if package.split("/")[1] in lic), ""
        )
        for package in packages
        if "/" in package and not package.startswith("stdlib/")
    }
    manifest = {
        "held_out_rule": f"sha1(name)[:4] as big-endian int % 100 < {HELD_OUT_PERCENT}",
        "licenses": {p: lic for p, lic in licenses.items() if lic},  # what a strict corpus read (model card)
        "excluded_packages": sorted(EXCLUDED_PACKAGES | bench_packages()),
        "files": len(files),
        "bytes": sum(p["bytes"] for p in packages.values()),
        "packages": packages,
        "held_out_files": held_out,
    }
    out.write_text(json.dumps(manifest, indent=1))
    return manifest
