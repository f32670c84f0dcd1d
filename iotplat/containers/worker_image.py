"""The worker image: the worker's wheelhouse on top of a pinned Python base image, built on the controller.

    build_worker_image(wheelhouse, base_archive, base_ref, platform, dest) -> WorkerImage

Where and how it is built, and why:
- On the controller, by Python, without Docker: the controller already builds the wheelhouse the package runtime
  installs (iotplat/deploy/wheelhouse.py), so the image carries exactly the same wheels; no engine (and no root, no
  dockerd changing the firewall) is needed there; the result is an archive that reaches every host through the
  same verified path as the upstream images, so air-gapped sites need nothing else.
- The base is an upstream image pinned by digest (images.DEFAULT_IMAGES["worker-base"], python:3.13-slim-trixie),
  available offline as an archive and verified like any other (archive.verify_archive); its layers are copied
  unchanged, and their uncompressed digests (diff_ids) are checked here too while their sizes are counted.
- One layer is added: the wheels installed by pip (`--target`, offline, `--no-deps`, no bytecode) into
  /opt/iotplat/lib, and /var/lib/iotplat-worker owned by the worker's user. The config runs
  `python3 -m iotplat.worker` as uid/gid 10001 with PYTHONPATH pointing there: the base's own python3 is used, no
  compiler or pip runs in the image, nothing in it runs as root.
- Reproducible: the same wheelhouse and base give the same layer bytes (sorted entries, mtime 0, numeric owners),
  the same config and so the same image ID (config digest) and manifest digest.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from iotplat import __version__
from iotplat.errors import IotplatError

from . import oci
from .archive import VerifiedImage, layer_blobs, read_config, verify_archive
from .images import ImageRef, parse_image_ref
from .oci import FileEntry, ImageConfig, Platform

WORKER_UID = 10001
WORKER_IMAGE_NAME = "localhost/iotplat-worker"  # a local name: this image is never pulled from a registry
LIB_DIR = "/opt/iotplat/lib"
DATA_DIR = "/var/lib/iotplat-worker"
CONFIG_PATH = "/etc/iotplat/worker.toml"
MAX_SIZE = 150 * 1000 * 1000  # bytes, uncompressed (what `docker image inspect` reports as Size)


class WorkerImageError(IotplatError):
    """The worker image cannot be built (a bad wheelhouse or base image); the message says which and how to fix it."""


@dataclass(frozen=True)
class WorkerImage:
    archive: Path
    ref: ImageRef  # localhost/iotplat-worker:<version>-<wheelhouse>@<manifest digest>
    config_digest: str  # the image ID hosts show after loading
    size: int  # uncompressed bytes of all layers
    base: ImageRef
    user: str


def build_worker_image(wheelhouse: Path, base_archive: Path, base_ref: ImageRef, platform: Platform, dest: Path,
                       *, max_size: int = MAX_SIZE) -> WorkerImage:
    """Build the worker image for `platform` into `dest` (a directory): `dest/<image id>.tar`, reused when the
    same inputs built it before."""
    wheelhouse = Path(wheelhouse)
    sums = wheelhouse / "SHA256SUMS"
    if not sums.is_file():
        raise WorkerImageError(f"{wheelhouse} is not a worker wheelhouse (no SHA256SUMS): build it with iotplat")
    wheelhouse_digest = hashlib.sha256(sums.read_bytes()).hexdigest()[:12]
    base = verify_archive(base_archive, base_ref, platform)
    base_config = read_config(base)
    base_size = _check_base_layers(base)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iotplat-worker-image-") as tmp:
        lib = Path(tmp) / "lib"
        _install(wheelhouse, lib)
        entries = [FileEntry(DATA_DIR, None, 0o700, WORKER_UID, WORKER_UID)]
        for path in sorted(lib.rglob("*")):
            rel = path.relative_to(lib).as_posix()
            if rel.split("/", 1)[0] == "bin" or "__pycache__" in rel.split("/"):
                continue  # console scripts point at this controller's python; no bytecode (reproducible)
            target = f"{LIB_DIR}/{rel}"
            if path.is_dir():
                entries.append(FileEntry(target, None, 0o755))
            else:
                entries.append(FileEntry(target, path.read_bytes(), 0o644))
        layer = oci.tree_layer(entries, Path(tmp) / "worker-layer.tar.gz")
        layer_size = _plain_size(layer.path)
        size = base_size + layer_size
        if size > max_size:
            raise WorkerImageError(f"the worker image would be {size / 1e6:.0f} MB (base {base_size / 1e6:.0f} MB), "
                                   f"more than {max_size / 1e6:.0f} MB: use a slimmer base image")
        env = [e for e in base.config.env if not e.startswith(("PYTHONPATH=", "PYTHONDONTWRITEBYTECODE="))]
        env += [f"PYTHONPATH={LIB_DIR}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]
        config = ImageConfig(
            user=f"{WORKER_UID}:{WORKER_UID}",
            entrypoint=("python3", "-m", "iotplat.worker"),
            cmd=("--config", CONFIG_PATH),
            env=tuple(env),
            working_dir="/",
            labels=(
                ("org.iotplat.wheelhouse", wheelhouse_digest),
                ("org.opencontainers.image.base.digest", base_ref.digest),
                ("org.opencontainers.image.base.name", f"{base_ref.name}:{base_ref.tag}"),
                ("org.opencontainers.image.title", "iotplat ingestion worker"),
                ("org.opencontainers.image.version", __version__),
            ),
        )
        base_layers = [oci.Layer(None, d.digest, diff, d.size, _oci_type(d.media_type))
                       for d, diff in zip(base.layers, base.diff_ids, strict=True)]
        docs = oci.image_documents(
            [*base_layers, layer], config, platform, base_config=base_config,
            history=[f"iotplat worker {__version__} from wheelhouse {wheelhouse_digest} into {LIB_DIR}"],
        )
        tag = f"{__version__}-{wheelhouse_digest}"
        archive = dest / f"{docs.config_digest.split(':', 1)[1][:32]}.tar"
        if not archive.exists():
            blobs = [blob for _d, blob in layer_blobs(base)]
            blobs.append(oci.ArchiveBlob(layer.digest, layer.size, path=layer.path))
            oci.save_image(archive, docs, blobs, name=f"{WORKER_IMAGE_NAME}", tag=tag, familiar=WORKER_IMAGE_NAME)
    ref = parse_image_ref(f"{WORKER_IMAGE_NAME}:{tag}@{docs.digest}")
    return WorkerImage(archive, ref, docs.config_digest, size, base_ref, config.user)


def _install(wheelhouse: Path, target: Path) -> None:
    """pip, offline, from the wheelhouse only: the pinned dependencies and the worker wheel, by name (a path would
    be recorded in direct_url.json and make the layer depend on where the wheelhouse lies)."""
    requirements = wheelhouse / "requirements-worker.txt"
    wheels = sorted(wheelhouse.glob("iotplat-*.whl"))
    if not requirements.is_file() or len(wheels) != 1:
        raise WorkerImageError(f"{wheelhouse} holds no requirements-worker.txt or not exactly one iotplat wheel")
    version = wheels[0].name.split("-")[1]
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
            "--no-deps", "--no-compile", "--no-cache-dir", "--find-links", str(wheelhouse), "--target", str(target),
            "--requirement", str(requirements), f"iotplat=={version}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                                                  "PIP_NO_INPUT": "1"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise WorkerImageError(f"installing the wheelhouse {wheelhouse} into the image failed: {last}")


def _check_base_layers(base: VerifiedImage) -> int:
    """Decompress every base layer: its sha256 must be the config's diff_id (what `docker load` checks on the
    host, checked here first); returns the uncompressed size of them all."""
    total = 0
    for (desc, blob), diff_id in zip(layer_blobs(base), base.diff_ids, strict=True):
        h = hashlib.sha256()
        with blob.open() as raw:
            stream = raw if desc.media_type == oci.OCI_LAYER_TAR else gzip.GzipFile(fileobj=raw, mode="rb")
            while chunk := stream.read(oci.CHUNK):
                h.update(chunk)
                total += len(chunk)
        if "sha256:" + h.hexdigest() != diff_id:
            raise WorkerImageError(f"{base.archive}: base layer {desc.digest} does not unpack to {diff_id}: the base "
                                   "image is corrupt; get a fresh copy")
    return total


def _plain_size(path: Path) -> int:
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(oci.CHUNK):
            n += len(chunk)
    return n


def _oci_type(media_type: str) -> str:
    return oci.OCI_LAYER_GZIP if media_type == oci.DOCKER_LAYER_GZIP else media_type
