"""Archives checked against their pinned digest on the controller, byte for byte, before anything is loaded.

The archives are written here by iotplat's own OCI writer (the same code that builds the worker image) and then
changed the ways a wrong or tampered archive differs: another digest, a changed layer, a missing platform, the
legacy `docker save` layout, Docker 25's generated manifests, duplicate entries. That the host's Docker loads what
passes, and reports the image ID checked here, is proven on real hosts in test_containers_hosts.py.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from iotplat.containers import oci
from iotplat.containers.archive import (
    ArchiveError,
    LoadedImageError,
    check_loaded,
    loaded_image_problem,
    prepare_archive,
    verify_archive,
    write_load_archive,
)
from iotplat.containers.images import parse_image_ref
from iotplat.containers.oci import FileEntry, ImageConfig, Platform
from iotplat.errors import ExitCode

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


def build(tmp: Path, *, index: bool = False, platform: Platform = AMD64, payload: bytes = b"hello\n",
          name: str = "docker.io/library/demo", familiar: str = "demo", tag: str = "1.0") -> tuple[Path, str, object]:
    """A one-layer image archive; returns (archive, registry digest, documents)."""
    layer = oci.tree_layer([FileEntry("/etc/demo.txt", payload), FileEntry("/bin/tool", b"#!/bin/sh\n", 0o755)],
                           tmp / f"layer-{payload.hex()[:8]}.tar.gz")
    docs = oci.image_documents([layer], ImageConfig(user="1883:1883", cmd=("/bin/tool",)), platform,
                               wrap_in_index=index)
    archive = tmp / f"demo-{'index' if index else 'manifest'}-{platform.architecture}.tar"
    oci.save_image(archive, docs, [oci.ArchiveBlob(layer.digest, layer.size, path=layer.path)],
                   name=name, tag=tag, familiar=familiar)
    return archive, docs.digest, docs


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_tar(path: Path, files: dict[str, bytes], extra: list[tuple[str, bytes]] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in [*files.items(), *extra]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def ref(digest: str, text: str = "demo:1.0") -> object:
    return parse_image_ref(f"{text}@{digest}")


def test_manifest_archive_is_proven(tmp_path):
    archive, digest, docs = build(tmp_path)
    img = verify_archive(archive, ref(digest), AMD64)
    assert img.manifest.digest == digest and img.index_chain == ()
    assert img.config_digest == docs.config_digest
    assert img.config.user == "1883:1883" and img.config.cmd == ("/bin/tool",)
    assert len(img.layers) == 1 and len(img.diff_ids) == 1


def test_index_archive_walks_to_the_host_platform(tmp_path):
    archive, digest, docs = build(tmp_path, index=True)
    img = verify_archive(archive, ref(digest), AMD64)
    assert img.index_chain == (digest,)
    assert img.manifest.digest == docs.manifest_digest != digest
    # the platform manifest's own digest is a valid pin too (what `skopeo copy` without --all keeps)
    assert verify_archive(archive, ref(docs.manifest_digest), AMD64).config_digest == docs.config_digest


def test_another_digest_is_refused_naming_what_the_archive_holds(tmp_path):
    archive, digest, _ = build(tmp_path)
    other = "sha256:" + "0" * 64
    with pytest.raises(ArchiveError) as info:
        verify_archive(archive, ref(other), AMD64)
    text = str(info.value)
    assert f"does not hold {other}" in text and digest in text and "skopeo copy --preserve-digests" in text
    assert info.value.exit_code == ExitCode.INVALID and "\n" not in text


def test_a_changed_layer_is_refused(tmp_path):
    archive, digest, docs = build(tmp_path)
    files = members(archive)
    layer_digest = json.loads(docs.manifest)["layers"][0]["digest"]
    name = oci.blob_name(layer_digest)
    evil = gzip.compress(b"not the layer" + bytes(100), mtime=0)
    files[name] = evil
    tampered = write_tar(tmp_path / "tampered.tar", files)
    with pytest.raises(ArchiveError, match=f"layer {layer_digest} does not match its digest"):
        verify_archive(tampered, ref(digest), AMD64)


def test_a_changed_config_is_refused(tmp_path):
    archive, digest, docs = build(tmp_path)
    files = members(archive)
    cfg = json.loads(docs.config)
    cfg["config"]["User"] = "0:0"
    files[oci.blob_name(docs.config_digest)] = oci.canonical_json(cfg)
    with pytest.raises(ArchiveError, match="image config .* does not match its digest"):
        verify_archive(write_tar(tmp_path / "t.tar", files), ref(digest), AMD64)


def test_a_missing_layer_is_refused(tmp_path):
    archive, digest, docs = build(tmp_path)
    files = members(archive)
    del files[oci.blob_name(json.loads(docs.manifest)["layers"][0]["digest"])]
    with pytest.raises(ArchiveError, match="holds no layer"):
        verify_archive(write_tar(tmp_path / "t.tar", files), ref(digest), AMD64)


def test_duplicate_entries_are_refused(tmp_path):
    """A second entry with the same name would win on extraction (docker load untars in order)."""
    archive, digest, docs = build(tmp_path)
    files = members(archive)
    name = oci.blob_name(docs.config_digest)
    with pytest.raises(ArchiveError, match="twice"):
        verify_archive(write_tar(tmp_path / "t.tar", files, [(name, b"{}")]), ref(digest), AMD64)


def test_another_platform_is_refused_with_what_it_has(tmp_path):
    archive, digest, _ = build(tmp_path, index=True, platform=ARM64)
    with pytest.raises(ArchiveError, match=r"has no image for linux/amd64 \(it has: linux/arm64/v8\)"):
        verify_archive(archive, ref(digest), AMD64)
    assert verify_archive(archive, ref(digest), ARM64).platform == ARM64


def test_a_mislabelled_manifest_is_refused(tmp_path):
    """A manifest pinned directly (no index) must still be for the host's platform: its config says so."""
    archive, digest, _ = build(tmp_path, platform=ARM64)
    with pytest.raises(ArchiveError, match="is for linux/arm64/v8, the host is linux/amd64"):
        verify_archive(archive, ref(digest), AMD64)


def test_legacy_docker_save_is_refused_with_how_to_make_a_provable_one(tmp_path):
    """Debian 12's docker.io 20.10 writes manifest.json + <id>.json + <layer>/layer.tar: no registry manifest."""
    archive, digest, docs = build(tmp_path)
    files = members(archive)
    legacy = {
        "manifest.json": json.dumps([{"Config": "abc.json", "RepoTags": ["demo:1.0"], "Layers": ["l1/layer.tar"]}]).encode(),
        "abc.json": docs.config,
        "l1/layer.tar": b"",
        "repositories": b"{}",
    }
    with pytest.raises(ArchiveError) as info:
        verify_archive(write_tar(tmp_path / "legacy.tar", legacy), ref(digest), AMD64)
    assert "legacy `docker save` archive" in str(info.value)
    assert f"skopeo copy --preserve-digests docker://demo@{digest}" in str(info.value)
    del files  # the OCI members are not needed for this case


def test_docker25_graphdriver_save_cannot_prove_a_registry_digest(tmp_path):
    """Docker >= 25 on the graph-driver store writes an OCI layout, but of a manifest it generates (uncompressed
    layers, its own digest): the registry digest is not in it, and iotplat says so instead of guessing."""
    archive, digest, docs = build(tmp_path)
    files = members(archive)
    generated = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                    "config": {"mediaType": oci.OCI_CONFIG, "digest": docs.config_digest,
                                               "size": len(docs.config)},
                                    "layers": []})
    gen_digest = oci.sha256_digest(generated)
    del files[oci.blob_name(digest)]
    files[oci.blob_name(gen_digest)] = generated
    files["index.json"] = oci.canonical_json({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": gen_digest, "size": len(generated)}]})
    with pytest.raises(ArchiveError) as info:
        verify_archive(write_tar(tmp_path / "d25.tar", files), ref(digest), AMD64)
    assert f"does not hold {digest}" in str(info.value) and gen_digest in str(info.value)


def test_not_a_tar_and_missing_file(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArchiveError, match="not a tar archive|is not an image archive"):
        verify_archive(junk, ref("sha256:" + "1" * 64), AMD64)
    with pytest.raises(ArchiveError, match="not found"):
        verify_archive(tmp_path / "nope.tar", ref("sha256:" + "1" * 64), AMD64)


def test_load_archive_is_deterministic_and_holds_only_verified_blobs(tmp_path):
    archive, digest, docs = build(tmp_path, index=True)
    img = verify_archive(archive, ref(digest), AMD64)
    a = write_load_archive(img, tmp_path / "a.tar")
    b = write_load_archive(img, tmp_path / "b.tar")
    assert a.sha256 == b.sha256 and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    files = members(a.path)
    manifest = json.loads(files["manifest.json"])
    assert manifest == [{"Config": oci.blob_name(docs.config_digest), "RepoTags": ["demo:1.0"],
                         "Layers": [oci.blob_name(d.digest) for d in img.layers]}]
    blobs = {n for n in files if n.startswith("blobs/")}
    assert blobs == {oci.blob_name(d) for d in (docs.config_digest, docs.manifest_digest, *(x.digest for x in img.layers))}
    # the host's copy proves the platform manifest; the index stays on the controller
    assert verify_archive(a.path, ref(docs.manifest_digest), AMD64).config_digest == img.config_digest


def test_prepare_archive_caches_by_source_and_reverifies_changes(tmp_path):
    archive, digest, _ = build(tmp_path)
    cache = tmp_path / "cache"
    first = prepare_archive(archive, ref(digest), AMD64, cache)
    again = prepare_archive(archive, ref(digest), AMD64, cache)
    assert first.path == again.path and first.sha256 == again.sha256
    # the same file name with other bytes is verified again (and refused)
    (tmp_path / "x").mkdir()
    other, _, _ = build(tmp_path / "x", payload=b"other\n")
    archive.write_bytes(other.read_bytes())
    with pytest.raises(ArchiveError):
        prepare_archive(archive, ref(digest), AMD64, cache)


def _inspect(image_id: str, tags: list[str], arch: str = "amd64") -> str:
    return json.dumps([{"Id": image_id, "RepoTags": tags, "Os": "linux", "Architecture": arch}])


def test_loaded_image_is_checked_by_its_image_id(tmp_path):
    archive, digest, docs = build(tmp_path, index=True)
    img = verify_archive(archive, ref(digest), AMD64)
    assert loaded_image_problem(_inspect(docs.config_digest, ["demo:1.0"]), img) is None
    assert loaded_image_problem(_inspect(docs.config_digest, ["docker.io/library/demo:1.0"]), img) is None
    wrong = "sha256:" + "9" * 64
    assert "loaded image " + wrong in loaded_image_problem(_inspect(wrong, ["demo:1.0"]), img)
    assert "containerd image store" in loaded_image_problem(_inspect(docs.manifest_digest, ["demo:1.0"]), img)
    assert "not tagged demo:1.0" in loaded_image_problem(_inspect(docs.config_digest, ["other:1"]), img)
    assert "not linux/amd64" in loaded_image_problem(_inspect(docs.config_digest, ["demo:1.0"], "arm64"), img)
    assert "printed no image" in loaded_image_problem("[]", img)
    with pytest.raises(LoadedImageError):
        check_loaded("[]", img)
