"""The worker's wheelhouse: what worker hosts install, offline, into /opt/iotplat/venv.

    <root>/<digest>/iotplat-<version>-py3-none-any.whl   the worker (iotplat/__init__.py + iotplat/worker/ only)
    <root>/<digest>/<dependency wheels>                  copied from <root>/deps (pip download, once)
    <root>/<digest>/requirements-worker.txt              the pinned dependencies, versions = this controller's
    <root>/<digest>/SHA256SUMS                           of the above; <digest> is the start of its sha256

Why a hand-built wheel: the worker must go to hosts without the CLI's dependencies (pydantic, ansible, ...)
and byte-for-byte reproducibly, whether iotplat runs from a checkout or from an installed wheel; no build
backend packages a sub-tree of an installed package. A wheel is a zip with a dist-info folder (PEP 427),
so this is ~60 lines: sorted entries, fixed timestamps, RECORD with sha256.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

from iotplat import __version__
from iotplat.errors import IotplatError

WORKER_REQUIREMENTS = ("paho-mqtt", "nats-py")  # nats-py: the NATS JetStream transport (pure Python)
DIST = "iotplat"  # the worker subset of the iotplat distribution: hosts never have the full one
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _pinned() -> list[str]:
    out = []
    for name in WORKER_REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise IotplatError(f"{name} is not installed on the controller; reinstall iotplat") from None
    return out


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_worker_wheel(dest: Path) -> Path:
    """Write the worker wheel into dest; identical bytes for identical sources."""
    pkg = Path(__file__).resolve().parents[1]
    files: dict[str, bytes] = {"iotplat/__init__.py": (pkg / "__init__.py").read_bytes()}
    for path in sorted((pkg / "worker").rglob("*.py")):
        files[f"iotplat/worker/{path.relative_to(pkg / 'worker').as_posix()}"] = path.read_bytes()
    info = f"{DIST}-{__version__}.dist-info"
    requires = "".join(f"Requires-Dist: {r}\n" for r in _pinned())
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: iotplat\nVersion: {__version__}\n"
        "Summary: The iotplat ingestion worker (MQTT -> InfluxDB), built by iotplat for worker hosts\n"
        f"Requires-Python: >=3.11\n{requires}"
    ).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: iotplat\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    eps = ["[console_scripts]", "iotplat-worker = iotplat.worker.cli:main", "", "[iotplat.decoders]"]
    for ep in sorted(metadata.entry_points(group="iotplat.decoders"), key=lambda e: e.name):
        if ep.value.startswith("iotplat.worker."):
            eps.append(f"{ep.name} = {ep.value}")
    files[f"{info}/entry_points.txt"] = ("\n".join(eps) + "\n").encode()
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in sorted(files.items())]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(files.items()):
            zi = zipfile.ZipInfo(name, _EPOCH)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{DIST}-{__version__}-py3-none-any.whl"
    for stale in dest.glob(f"{DIST}-*.whl"):
        if stale != target:
            stale.unlink()
    data = buf.getvalue()
    if not target.exists() or target.read_bytes() != data:
        target.write_bytes(data)
    return target


def build_wheelhouse(root: Path) -> Path:
    """The wheelhouse of exactly this iotplat's worker: root/<digest>/ with the worker wheel, its dependency
    wheels, requirements-worker.txt and SHA256SUMS (the folder is named after the digest of SHA256SUMS).

    Per content, not one shared folder: two checkouts or releases on one controller must not deploy each
    other's worker. The dependency wheels are downloaded once into root/deps (their pins fix their content);
    on an air-gapped controller put them there. Folders unused for a week are removed."""
    root.mkdir(parents=True, exist_ok=True)
    pins = _pinned()
    deps = _ensure_deps(root / "deps", pins)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        build_worker_wheel(staging)
        for wheel in deps:
            shutil.copy2(wheel, staging / wheel.name)
        (staging / "requirements-worker.txt").write_text("\n".join(pins) + "\n")
        final = root / hashlib.sha256(write_checksums(staging).encode()).hexdigest()[:16]
        if not final.exists():
            try:
                staging.rename(final)
            except OSError:  # another run built the same folder at the same moment
                pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    final.touch()  # marks it used (mtime) for the pruning below
    week = time.time() - 7 * 86400
    for old in root.iterdir():
        if old.is_dir() and old.name not in ("deps", final.name) and not old.name.startswith(".") \
                and old.stat().st_mtime < week:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _ensure_deps(deps: Path, pins: list[str]) -> list[Path]:
    """The dependency wheels for pins in deps, downloaded with pip when one is missing."""
    def have() -> list[Path] | None:
        found = [sorted(deps.glob(f"{p.split('==')[0].replace('-', '_')}-{p.split('==')[1]}-*.whl")) for p in pins]
        return [w[0] for w in found] if all(found) else None

    deps.mkdir(parents=True, exist_ok=True)
    wheels = have()
    if wheels is not None:
        return wheels
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        raise IotplatError(f"pip is not available in {sys.prefix}; run `{sys.executable} -m ensurepip` "
                           "(iotplat uses it to download the worker's dependency wheels)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(deps), *pins],
        capture_output=True, text=True, timeout=600,
    )
    wheels = have()
    if proc.returncode != 0 or wheels is None:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise IotplatError(f"cannot download the worker's dependencies ({', '.join(pins)}): {last}; "
                           f"on an air-gapped controller put their wheels into {deps}")
    return wheels


SUMS = "SHA256SUMS"


def write_checksums(dest: Path) -> str:
    """SHA256SUMS (sha256sum format) of the wheels and requirements-worker.txt: the worker role compares its
    digest with what the host installed last, so an unchanged wheelhouse costs no pip run."""
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
             for f in sorted(dest.iterdir()) if f.name.endswith(".whl") or f.name == "requirements-worker.txt"]
    text = "".join(lines)
    target = dest / SUMS
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return text
