"""Image archives for hosts without registry access: verified on the controller, loaded and checked on the host.

    verify_archive(ARCHIVE, ref, platform)      reads the tar, proves ref.digest -> manifest -> config -> layers
    write_load_archive(verified, DEST)          the host's copy: only that platform's blobs + manifest.json
    loaded_image_problem(inspect, verified)     after `docker load` on the host: the image ID is the config digest

What can be verified, and where (docs/containers.md, "Digests"):

- The spec pins the registry digest (images.py). An archive can prove it only if it holds that manifest or index
  as a blob: OCI archives written by `skopeo copy --preserve-digests docker://NAME@DIGEST oci-archive:FILE`, by
  `docker save` from the containerd image store, by iotplat itself. Then every blob on the way down is checked
  byte for byte: the blob named by the digest, the index entry for the host's platform, its manifest, the config
  and every layer (sizes and sha256 against their descriptors).
- `docker save` from the classic graph-driver store -- Debian 12's docker.io 20.10 (only `manifest.json`, the
  legacy layout) and Debian 13's 26.1 (an OCI layout too, but with manifests `docker save` generates from
  uncompressed layers) -- holds no registry manifest at all: the registry digest cannot be proven from it, so such
  an archive is refused with how to make one that can. What such archives share is the image config, whose sha256
  is the image ID: that is what the host checks after loading, on every Docker.
- `docker load` on the graph-driver store reads only `manifest.json` (moby image/tarexport/load.go) and checks each
  layer's uncompressed digest against the config's diff_ids itself. The host never loads the archive it was given:
  it loads the one write_load_archive() wrote from verified blobs, whose manifest.json names exactly those blobs.

A problem is one line (ArchiveError, exit 2) raised before anything is written or loaded.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from iotplat.errors import IotplatError, InvalidInput

from . import oci
from .images import ImageRef, is_digest
from .oci import Descriptor, ImageConfig, Platform

MAX_DOCUMENT = 4 << 20  # manifests, indexes and configs: OCI's recommended limit for registries
MAX_INDEX_DEPTH = 3  # an index may point to an index (Docker 29's `docker save`), not deeper


class ArchiveError(InvalidInput):
    """An image archive that does not prove its pinned digest (or cannot be read): nothing was loaded."""


class LoadedImageError(IotplatError):
    """After `docker load` the host shows another image than the verified one: the unit is not started."""


@dataclass(frozen=True)
class VerifiedImage:
    """What an archive was proven to hold for one platform."""

    ref: ImageRef
    archive: Path
    platform: Platform
    manifest: Descriptor  # the platform's manifest (the ref's digest itself when it names a manifest)
    index_chain: tuple[str, ...]  # the index digests walked from ref.digest down to the manifest (may be empty)
    config_digest: str  # the image ID a graph-driver Docker shows after loading
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]

    @property
    def image_id(self) -> str:
        return self.config_digest

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class LoadArchive:
    """The archive a host loads: written by iotplat from verified blobs; its sha256 changes only with them."""

    path: Path
    sha256: str
    image: VerifiedImage


def verify_archive(path: Path, ref: ImageRef, platform: Platform) -> VerifiedImage:
    """Prove that the tar at `path` holds the image `ref` pins, for `platform`; raise ArchiveError otherwise."""
    path = Path(path)
    try:
        tar = tarfile.open(path, mode="r:*")
    except FileNotFoundError:
        raise ArchiveError(f"{path}: image archive not found (for {ref})") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"{path}: not a tar archive ({exc}); make it with `docker save` or `skopeo copy`") from None
    with tar:
        reader = _Reader(path, tar)
        return reader.verify(ref, platform)


class _Reader:
    def __init__(self, path: Path, tar: tarfile.TarFile) -> None:
        self.path = path
        self.tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in tar:
                name = self._normal(member.name)
                if name is None:
                    continue
                if name in self.members and not member.isdir():
                    raise self.error(f"holds {name} twice: an archive with duplicate entries is ambiguous")
                if not member.isdir():
                    self.members[name] = member
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise self.error(f"cannot be read as a tar ({exc})") from None

    def error(self, message: str, hint: str = "") -> ArchiveError:
        return ArchiveError(f"{self.path}: {message}" + (f" ({hint})" if hint else ""))

    @staticmethod
    def _normal(name: str) -> str | None:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            return None  # never read; a loader that honoured it would write outside its folder
        parts = [x for x in p.parts if x != "."]
        return "/".join(parts) if parts else None

    # --- blobs ------------------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return oci.blob_name(digest) in self.members

    def open_blob(self, digest: str) -> IO[bytes]:
        member = self.members[oci.blob_name(digest)]
        try:
            f = self.tar.extractfile(member)
        except (tarfile.TarError, KeyError) as exc:
            raise self.error(f"blob {digest} cannot be read ({exc})") from None
        if f is None:
            raise self.error(f"blob {digest} is not a file")
        return f

    def document(self, desc: Descriptor, what: str) -> dict[str, Any]:
        """A JSON blob (index, manifest, config), checked against its digest and size."""
        if not self.has_blob(desc.digest):
            raise self.error(f"holds no {what} {desc.digest}")
        if desc.size > MAX_DOCUMENT:
            raise self.error(f"{what} {desc.digest} claims {desc.size} bytes (more than {MAX_DOCUMENT})")
        with self.open_blob(desc.digest) as f:
            data = f.read(MAX_DOCUMENT + 1)
        if oci.sha256_digest(data) != desc.digest:
            raise self.error(f"{what} {desc.digest} does not match its digest: the archive was changed or is corrupt",
                             "get a fresh copy of the image")
        if desc.size >= 0 and len(data) != desc.size:
            raise self.error(f"{what} {desc.digest} is {len(data)} bytes, its descriptor says {desc.size}")
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise self.error(f"{what} {desc.digest} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise self.error(f"{what} {desc.digest} is not a JSON object")
        return doc

    def check_blob(self, desc: Descriptor, what: str) -> None:
        if not self.has_blob(desc.digest):
            raise self.error(f"holds no {what} {desc.digest}", "the archive is incomplete: save the whole image")
        h = hashlib.sha256()
        size = 0
        with self.open_blob(desc.digest) as f:
            while chunk := f.read(oci.CHUNK):
                h.update(chunk)
                size += len(chunk)
        if "sha256:" + h.hexdigest() != desc.digest:
            raise self.error(f"{what} {desc.digest} does not match its digest: the archive was changed or is corrupt",
                             "get a fresh copy of the image")
        if size != desc.size:
            raise self.error(f"{what} {desc.digest} is {size} bytes, the manifest says {desc.size}")

    # --- the walk ---------------------------------------------------------------------------------------

    def verify(self, ref: ImageRef, platform: Platform) -> VerifiedImage:
        if "index.json" not in self.members:
            if "manifest.json" in self.members:
                raise self.error(
                    f"is a legacy `docker save` archive: it holds no registry manifest, so it cannot prove {ref}",
                    f"make the archive with `skopeo copy --preserve-digests docker://{ref.pinned} "
                    f"oci-archive:{self.path.name}` (or `docker save` from a Docker with the containerd image store)",
                )
            raise self.error("is not an image archive (no index.json)",
                             "make it with `skopeo copy --preserve-digests docker://NAME@DIGEST oci-archive:FILE`")
        if not self.has_blob(ref.digest):
            raise self.error(f"does not hold {ref.digest}, the digest pinned for {ref.tagged}",
                             self._contents_hint())
        media = self._media_type_of(ref.digest)
        chain: list[str] = []
        desc = Descriptor(media, ref.digest, self.members[oci.blob_name(ref.digest)].size)
        for _ in range(MAX_INDEX_DEPTH + 1):
            doc = self.document(desc, "index" if desc.media_type in oci.INDEX_TYPES else "manifest")
            kind = _kind(doc, desc.media_type)
            if kind == "manifest":
                return self._manifest(ref, platform, desc, doc, tuple(chain))
            if kind != "index":
                raise self.error(f"{desc.digest} is neither an image index nor a manifest")
            chain.append(desc.digest)
            desc = self._pick(doc, desc.digest, platform)
        raise self.error(f"{ref.digest}: image indexes nested deeper than {MAX_INDEX_DEPTH}")

    def _media_type_of(self, digest: str) -> str:
        """The media type index.json gives a blob (or "" when it names it nowhere: read from the blob itself)."""
        try:
            with self.tar.extractfile(self.members["index.json"]) as f:  # type: ignore[union-attr]
                top = json.loads(f.read(MAX_DOCUMENT))
        except (ValueError, AttributeError, tarfile.TarError) as exc:
            raise self.error(f"index.json cannot be read ({exc})") from None
        for entry in top.get("manifests") or []:
            if isinstance(entry, dict) and entry.get("digest") == digest:
                return str(entry.get("mediaType") or "")
        return ""

    def _contents_hint(self) -> str:
        try:
            with self.tar.extractfile(self.members["index.json"]) as f:  # type: ignore[union-attr]
                top = json.loads(f.read(MAX_DOCUMENT))
            found = [str(e.get("digest")) for e in top.get("manifests") or [] if isinstance(e, dict)]
        except (ValueError, AttributeError, tarfile.TarError):
            found = []
        shown = ", ".join(found[:4]) or "nothing"
        return (f"it holds {shown}; a `docker save` from the graph-driver store writes manifests of its own, so make "
                "the archive with `skopeo copy --preserve-digests docker://NAME@DIGEST oci-archive:FILE`, or pin "
                "the digest you verified at the registry")

    def _pick(self, index: dict[str, Any], digest: str, platform: Platform) -> Descriptor:
        offered = []
        for entry in index.get("manifests") or []:
            if not isinstance(entry, dict):
                continue
            plat = entry.get("platform") or {}
            annotations = entry.get("annotations") or {}
            if annotations.get("vnd.docker.reference.type"):  # build attestations, not images
                continue
            media = str(entry.get("mediaType") or "")
            if media in oci.INDEX_TYPES and not plat:
                return _descriptor(entry, self)
            if plat:
                offered.append("/".join(str(plat.get(k)) for k in ("os", "architecture", "variant") if plat.get(k)))
            if platform.matches(plat) and media in oci.MANIFEST_TYPES:
                found = _descriptor(entry, self)
                if not self.has_blob(found.digest):
                    raise self.error(
                        f"holds the index {digest} but not its {platform} manifest {found.digest}",
                        "save the image with that platform's content (e.g. skopeo copy --all)",
                    )
                return found
        raise self.error(f"{digest} has no image for {platform}", f"it has: {', '.join(offered) or 'none'}")

    def _manifest(self, ref: ImageRef, platform: Platform, desc: Descriptor, doc: dict[str, Any],
                  chain: tuple[str, ...]) -> VerifiedImage:
        media = str(doc.get("mediaType") or "") or desc.media_type
        if media and media not in oci.MANIFEST_TYPES:
            raise self.error(f"manifest {desc.digest} has media type {media!r}, not an image manifest")
        config_desc = _descriptor(doc.get("config"), self, what="config")
        if config_desc.media_type not in oci.CONFIG_TYPES:
            raise self.error(f"{desc.digest}: config media type {config_desc.media_type!r} is not an image config")
        layers = tuple(_descriptor(x, self, what="layer") for x in doc.get("layers") or [])
        for layer in layers:
            if layer.media_type not in oci.LAYER_TYPES:
                raise self.error(
                    f"layer {layer.digest} is {layer.media_type!r}; hosts load gzip or plain tar layers only",
                    "zstd and foreign layers cannot be loaded by Debian 12's docker.io",
                )
        config = self.document(config_desc, "image config")
        if not platform.matches(config):
            got = "/".join(str(config.get(k)) for k in ("os", "architecture", "variant") if config.get(k))
            raise self.error(f"image {desc.digest} is for {got or 'an unknown platform'}, the host is {platform}")
        diff_ids = tuple((config.get("rootfs") or {}).get("diff_ids") or ())
        if len(diff_ids) != len(layers) or not all(isinstance(d, str) and is_digest(d) for d in diff_ids):
            raise self.error(f"image config {config_desc.digest} lists {len(diff_ids)} layer digests for "
                             f"{len(layers)} layers")
        for layer in layers:
            self.check_blob(layer, "layer")
        return VerifiedImage(
            ref=ref, archive=self.path, platform=platform,
            manifest=Descriptor(media or oci.OCI_MANIFEST, desc.digest, desc.size),
            index_chain=chain, config_digest=config_desc.digest,
            config=ImageConfig.from_json(config.get("config")), layers=layers, diff_ids=diff_ids,
        )


def _kind(doc: dict[str, Any], media_type: str) -> str:
    # the document's own mediaType is covered by its digest; index.json's (the descriptor's) is not
    media = str(doc.get("mediaType") or "") or media_type
    if media in oci.INDEX_TYPES or (not media and "manifests" in doc):
        return "index"
    if media in oci.MANIFEST_TYPES or (not media and "config" in doc and "layers" in doc):
        return "manifest"
    return "other"


def _descriptor(entry: Any, reader: _Reader, what: str = "manifest") -> Descriptor:
    if not isinstance(entry, dict):
        raise reader.error(f"a {what} descriptor is not an object")
    digest = entry.get("digest")
    size = entry.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise reader.error(f"a {what} descriptor has digest {digest!r}; iotplat checks sha256 digests only")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise reader.error(f"{what} {digest} has no valid size")
    return Descriptor(str(entry.get("mediaType") or ""), digest, size, entry.get("platform") or None)


def write_load_archive(image: VerifiedImage, dest: Path) -> LoadArchive:
    """The archive a host loads: the verified manifest, config and layers (hashed again as they are copied), an
    index.json naming the manifest and a manifest.json tagging it ref.tagged. Deterministic for the same image."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(image.archive, mode="r:*") as tar:
        reader = _Reader(image.archive, tar)

        def from_tar(desc: Descriptor) -> oci.ArchiveBlob:
            if not reader.has_blob(desc.digest):
                raise reader.error(f"lost blob {desc.digest} since it was verified")
            return oci.ArchiveBlob(desc.digest, desc.size, opener=lambda: reader.open_blob(desc.digest))

        config_size = reader.members[oci.blob_name(image.config_digest)].size
        blobs = [from_tar(image.manifest), from_tar(Descriptor(oci.OCI_CONFIG, image.config_digest, config_size)),
                 *(from_tar(layer) for layer in image.layers)]
        top = Descriptor(image.manifest.media_type, image.manifest.digest, image.manifest.size, annotations={
            oci.ANNOTATION_IMAGE_NAME: f"{image.ref.name}:{image.ref.tag}",
            oci.ANNOTATION_REF_NAME: image.ref.tag,
        })
        try:
            sha = oci.write_archive(dest, blobs, top, repo_tags=[image.ref.tagged], config_digest=image.config_digest,
                                    layer_digests=[layer.digest for layer in image.layers])
        except oci.DigestMismatch as exc:
            raise ArchiveError(f"{image.archive}: {exc}; nothing was written") from None
    return LoadArchive(dest, sha, image)


def prepare_archive(source: Path, ref: ImageRef, platform: Platform, cache: Path) -> LoadArchive:
    """verify_archive + write_load_archive into `cache`, reusing an earlier result for the same source bytes.

    The cached archive is named after the image's config digest and platform; a marker records the source's size,
    mtime and the ref, so an unchanged source is not read twice, and any change re-verifies it."""
    source = Path(source)
    try:
        st = source.stat()
    except FileNotFoundError:
        raise ArchiveError(f"{source}: image archive not found (for {ref})") from None
    key = hashlib.sha256(f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{ref}\0{platform}".encode()).hexdigest()
    marker = cache / f"{key[:32]}.json"
    if marker.exists():
        try:
            rec = json.loads(marker.read_text())
            path = cache / rec["file"]
            if path.exists():
                image = verify_archive(path, ref, platform)  # cheap: the small archive iotplat wrote itself
                return LoadArchive(path, rec["sha256"], _with_source(image, source))
        except (ValueError, KeyError, ArchiveError):
            pass
    image = verify_archive(source, ref, platform)
    name = f"{image.config_digest.split(':', 1)[1][:32]}-{platform.architecture}{platform.variant}.tar"
    cache.mkdir(parents=True, exist_ok=True)
    loaded = write_load_archive(image, cache / name)
    marker.write_text(json.dumps({"file": name, "sha256": loaded.sha256, "source": str(source)}))
    return loaded


def _with_source(image: VerifiedImage, source: Path) -> VerifiedImage:
    return VerifiedImage(image.ref, source, image.platform, image.manifest, image.index_chain, image.config_digest,
                         image.config, image.layers, image.diff_ids)


# --- on the host, after `docker load` --------------------------------------------------------------------------


def load_argv(archive_on_host: str) -> list[str]:
    """`docker load` of the archive iotplat copied to the host."""
    return ["docker", "load", "--quiet", "--input", archive_on_host]


def inspect_argv(ref: ImageRef) -> list[str]:
    """The loaded image as Docker knows it by its tag (`docker image inspect` prints a JSON list)."""
    return ["docker", "image", "inspect", ref.tagged]


def loaded_image_problem(inspect_output: str, image: VerifiedImage) -> str | None:
    """None when `docker image inspect ref.tagged` shows the verified image, else one line saying what differs."""
    try:
        data = json.loads(inspect_output)
        item = data[0] if isinstance(data, list) else data
        got_id = str(item.get("Id") or "")
        tags = [str(t) for t in item.get("RepoTags") or []]
        os_arch = (str(item.get("Os") or ""), str(item.get("Architecture") or ""))
    except (ValueError, IndexError, AttributeError, TypeError):
        return f"{image.ref.tagged}: `docker image inspect` printed no image (was it loaded?)"
    if got_id != image.config_digest:
        if got_id == image.manifest.digest or got_id in image.index_chain:
            return (f"{image.ref.tagged}: the host's Docker uses the containerd image store (image ID {got_id[:19]}... "
                    "is a manifest digest); iotplat supports the graph-driver store Debian's docker.io uses")
        return (f"{image.ref.tagged}: the host loaded image {got_id or 'nothing'}, not the verified "
                f"{image.config_digest}; the unit is not started")
    if not any(_same_tag(t, image.ref) for t in tags):
        return f"{image.ref.tagged}: the loaded image {got_id[:19]}... is not tagged {image.ref.tagged} (tags: {tags})"
    if os_arch != (image.platform.os, image.platform.architecture):
        return f"{image.ref.tagged}: the loaded image is for {'/'.join(os_arch)}, not {image.platform}"
    return None


def _same_tag(tag: str, ref: ImageRef) -> bool:
    return tag in (ref.tagged, f"{ref.name}:{ref.tag}")


def check_loaded(inspect_output: str, image: VerifiedImage) -> None:
    problem = loaded_image_problem(inspect_output, image)
    if problem:
        raise LoadedImageError(problem)


def read_config(image: VerifiedImage) -> dict[str, Any]:
    """The whole image config of a verified image (checked against its digest again)."""
    with tarfile.open(image.archive, mode="r:*") as tar:
        reader = _Reader(image.archive, tar)
        size = reader.members[oci.blob_name(image.config_digest)].size
        return reader.document(Descriptor(oci.OCI_CONFIG, image.config_digest, size), "image config")


def layer_blobs(image: VerifiedImage) -> list[tuple[Descriptor, oci.ArchiveBlob]]:
    """The layers of a verified image as blobs another archive can copy (each opens its own reader; every copy is
    hashed again by oci.write_archive)."""
    def opener(digest: str):  # noqa: ANN202 - returns a file object that closes its tar with it
        def open_() -> IO[bytes]:
            tar = tarfile.open(image.archive, mode="r:*")
            reader = _Reader(image.archive, tar)
            f = reader.open_blob(digest)
            return _Closing(f, tar)
        return open_

    return [(d, oci.ArchiveBlob(d.digest, d.size, opener=opener(d.digest))) for d in image.layers]


class _Closing:
    """A member file that closes its tar when it is closed."""

    def __init__(self, f: IO[bytes], tar: tarfile.TarFile) -> None:
        self.f = f
        self.tar = tar

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        self.tar.close()
