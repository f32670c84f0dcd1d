"""OCI image layout, written and read by Python: what `docker save` archives and image builds are made of.

An image archive here is a tar holding an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) plus
Docker's `manifest.json`, which is the only file Docker's graph-driver image store reads on `docker load` (Debian
12's docker.io 20.10 and Debian 13's 26.1 alike; moby image/tarexport/load.go). Every blob is named by the sha256
of its bytes, so a reader can check every byte against the digests that point to it.

Hand-written because the maintained tools that write OCI layouts (skopeo, umoci, buildah, crane) are Go programs
that need either a registry or a container runtime, and no maintained Python library writes image layouts; the
format is a few JSON documents and a tar (OCI image-spec 1.1: image-layout.md, manifest.md, config.md).
Writing is deterministic: sorted JSON, fixed tar metadata, gzip with mtime 0, so the same inputs give the same
bytes and digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
LAYER_TYPES = (OCI_LAYER_GZIP, OCI_LAYER_TAR, DOCKER_LAYER_GZIP)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"  # what `docker save` and containerd write next to ref.name
EPOCH = "1970-01-01T00:00:00Z"  # `created` of every image iotplat writes: reproducible
CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The bytes iotplat writes for a JSON document: sorted keys, no spaces (the digest depends on them)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def blob_name(digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexpart}"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Platform:
    """The platform of a host or an image (OCI image-index `platform`)."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def of_machine(cls, machine: str) -> Platform:
        """The platform of a Linux host from `uname -m` (Ansible's ansible_architecture)."""
        arch = {"x86_64": ("amd64", ""), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
                "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", ""), "i386": ("386", ""),
                "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", "")}.get(machine)
        if arch is None:
            raise ValueError(f"unknown machine architecture {machine!r}")
        return cls("linux", *arch)

    def matches(self, other: dict[str, Any]) -> bool:
        """Does an index entry's `platform` (or an image config's os/architecture/variant) fit this platform?
        A missing variant fits (e.g. arm64 images often leave out v8)."""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        variant = other.get("variant") or ""
        return not variant or not self.variant or variant == self.variant


# --- writing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A gzip-compressed layer tar in a file, with the digests the manifest (compressed) and config (diff_id) need."""

    path: Path | None  # None: a layer of a base image, copied from its archive
    digest: str  # sha256 of the compressed bytes
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # compressed size
    media_type: str = OCI_LAYER_GZIP

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


class _HashingWriter(io.RawIOBase):
    """A file-like sink that hashes and counts what passes through it on its way to `out`."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        self.out.write(view)
        return len(view)


def compress_layer(tar_stream: IO[bytes], dest: Path, level: int = 6) -> Layer:
    """gzip an uncompressed layer tar into `dest` (deterministic: no name, mtime 0) and digest both forms."""
    with open(dest, "wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=level) as gz:
            plain = _HashingWriter(gz)  # type: ignore[arg-type]
            shutil.copyfileobj(tar_stream, plain, CHUNK)
    return Layer(dest, "sha256:" + compressed.hash.hexdigest(), "sha256:" + plain.hash.hexdigest(), compressed.size)


@dataclass(frozen=True)
class FileEntry:
    """One entry of a layer iotplat writes itself (the worker's files)."""

    path: str  # absolute path in the image, e.g. /opt/iotplat/lib/iotplat/__init__.py
    data: bytes | None = None  # None for a directory
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def tree_layer(entries: Iterable[FileEntry], dest: Path) -> Layer:
    """A layer from explicit entries: sorted, parents first, mtime 0, numeric owners (reproducible)."""
    items: dict[str, FileEntry] = {}
    for e in entries:
        rel = e.path.strip("/")
        parts = rel.split("/")
        for i in range(1, len(parts)):  # parent directories, unless given
            items.setdefault("/".join(parts[:i]), FileEntry("/" + "/".join(parts[:i]), None, 0o755))
        items[rel] = e
    buf = tempfile.TemporaryFile()
    with buf:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in sorted(items):
                e = items[rel]
                info = tarfile.TarInfo(rel + ("/" if e.data is None else ""))
                info.mtime = 0
                info.uid, info.gid = e.uid, e.gid
                info.uname = info.gname = ""
                info.mode = e.mode
                if e.data is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
        buf.seek(0)
        return compress_layer(buf, dest)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (OCI config.md `config`)."""

    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    working_dir: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Env": list(self.env)}
        if self.user:
            out["User"] = self.user
        if self.entrypoint:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            out["Cmd"] = list(self.cmd)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.labels:
            out["Labels"] = dict(self.labels)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ImageConfig:
        data = data or {}
        return cls(
            user=str(data.get("User") or ""),
            entrypoint=tuple(str(x) for x in data.get("Entrypoint") or ()),
            cmd=tuple(str(x) for x in data.get("Cmd") or ()),
            env=tuple(str(x) for x in data.get("Env") or ()),
            working_dir=str(data.get("WorkingDir") or ""),
            labels=tuple(sorted((str(k), str(v)) for k, v in (data.get("Labels") or {}).items())),
        )


@dataclass
class ImageDocuments:
    """The JSON documents of one single-platform image, as bytes, and their digests."""

    config: bytes
    manifest: bytes
    index: bytes | None = None  # a one-entry image index around the manifest (a multi-platform image's shape)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def digest(self) -> str:
        """The registry digest: of the index when there is one, else of the manifest."""
        return sha256_digest(self.index if self.index is not None else self.manifest)


def image_documents(layers: list[Layer], config: ImageConfig, platform: Platform, *, history: Iterable[str] = (),
                    base_config: dict[str, Any] | None = None, wrap_in_index: bool = False) -> ImageDocuments:
    """Config, manifest (and optionally an index) for `layers` on top of nothing (or of `base_config`'s layers,
    which must be the first entries of `layers`)."""
    diff_ids = [layer.diff_id for layer in layers]
    hist = list((base_config or {}).get("history") or [])
    for text in history:
        hist.append({"created": EPOCH, "created_by": text})
    cfg: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": EPOCH,
        "config": config.to_json(),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": hist,
    }
    if platform.variant:
        cfg["variant"] = platform.variant
    config_bytes = canonical_json(cfg)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor(OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes)).to_json(),
        "layers": [layer.descriptor().to_json() for layer in layers],
    }
    manifest_bytes = canonical_json(manifest)
    docs = ImageDocuments(config_bytes, manifest_bytes)
    if wrap_in_index:
        plat = {"os": platform.os, "architecture": platform.architecture}
        if platform.variant:
            plat["variant"] = platform.variant
        docs.index = canonical_json({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [Descriptor(OCI_MANIFEST, docs.manifest_digest, len(manifest_bytes), plat).to_json()],
        })
    return docs


@dataclass
class ArchiveBlob:
    """A blob to write into an archive: bytes in memory, or a file, or a member of another tar."""

    digest: str
    size: int
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None
    opener: Any = field(default=None, repr=False)  # () -> binary file object

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.path is not None:
            return open(self.path, "rb")
        return self.opener()


class DigestMismatch(Exception):
    """A blob's bytes changed between being checked and being copied."""


def write_archive(dest: Path, blobs: Iterable[ArchiveBlob], top: Descriptor, *, repo_tags: list[str],
                  config_digest: str, layer_digests: list[str]) -> str:
    """Write an image archive that `docker load` (graph driver: manifest.json) and OCI tools (index.json) both
    read; every blob is hashed again while it is copied. Returns the sha256 of the archive file."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top.to_json()]}
    docker_manifest = [{
        "Config": blob_name(config_digest),
        "RepoTags": list(repo_tags),
        "Layers": [blob_name(d) for d in layer_digests],
    }]
    whole = hashlib.sha256()
    with open(tmp, "wb") as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_dir(tar, "blobs/")
            _add_dir(tar, "blobs/sha256/")
            seen: set[str] = set()
            for blob in sorted(blobs, key=lambda b: b.digest):
                if blob.digest in seen:
                    continue
                seen.add(blob.digest)
                info = _file_info(blob_name(blob.digest), blob.size)
                with blob.open() as src:
                    checker = _CheckingReader(src, blob.digest, blob.size)
                    tar.addfile(info, checker)
                    checker.finish()
            for name, data in (("index.json", canonical_json(index)), ("manifest.json", canonical_json(docker_manifest)),
                               ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')):
                tar.addfile(_file_info(name, len(data)), io.BytesIO(data))
        whole = sink.hash
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, dest)
    return "sha256:" + whole.hexdigest()


class _CheckingReader(io.RawIOBase):
    """Reads `size` bytes from src, hashing them; finish() raises DigestMismatch if they are not `digest`."""

    def __init__(self, src: IO[bytes], digest: str, size: int) -> None:
        self.src = src
        self.digest = digest
        self.left = size
        self.size = size
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if n < 0 or n > self.left:
            n = self.left
        data = self.src.read(n)
        self.left -= len(data)
        self.hash.update(data)
        return data

    def finish(self) -> None:
        if self.left or self.src.read(1) or "sha256:" + self.hash.hexdigest() != self.digest:
            raise DigestMismatch(f"blob {self.digest} changed while it was copied")


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = _file_info(name, 0)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def save_image(dest: Path, docs: ImageDocuments, layers: Iterable[ArchiveBlob], *, name: str, tag: str,
               familiar: str) -> str:
    """Write an image (its documents plus layer blobs) as an archive tagged `familiar:tag`; index.json names the
    registry digest (the index when `docs` has one). Returns the archive's sha256."""
    blobs = [ArchiveBlob(docs.config_digest, len(docs.config), data=docs.config),
             ArchiveBlob(docs.manifest_digest, len(docs.manifest), data=docs.manifest), *layers]
    if docs.index is not None:
        blobs.append(ArchiveBlob(docs.digest, len(docs.index), data=docs.index))
        top_type = OCI_INDEX
    else:
        top_type = OCI_MANIFEST
    size = len(docs.index if docs.index is not None else docs.manifest)
    top = Descriptor(top_type, docs.digest, size,
                     annotations={ANNOTATION_IMAGE_NAME: f"{name}:{tag}", ANNOTATION_REF_NAME: tag})
    layer_digests = [d["digest"] for d in json.loads(docs.manifest)["layers"]]
    return write_archive(dest, blobs, top, repo_tags=[f"{familiar}:{tag}"], config_digest=docs.config_digest,
                         layer_digests=layer_digests)
