"""Stand-in images for the upstream ones, built here from Debian packages (no registry can be reached).

Each is a Debian root file system made by mmdebstrap (one layer), with an image config like the upstream image's
(its user id, command, paths), written as an OCI archive by iotplat's own writer under the upstream name and a
`-standin` tag; its digest is what a registry would serve for that content, so the archive is checked exactly as
a real one. Built once per content hash of the inputs and cached (IOTPLAT_TEST_IMAGE_DIR, default
/var/lib/iotplat/test-images): a rebuild only when the inputs change.

What they prove: the runtime around an image -- archives verified and loaded, units, mounts of the rendered files,
secrets as read-only files, the container's user owning its data, logs in the journal, restarts, upgrades by
digest. What they cannot prove: the upstream images themselves. Known differences:

- eclipse-mosquitto: upstream is Alpine + Mosquitto 2.0.22 (musl, `/docker-entrypoint.sh` that chowns /mosquitto
  when run as root, CMD `mosquitto -c /mosquitto/config/mosquitto.conf`); the stand-in is Debian 12 + Mosquitto
  2.0.11 without that entrypoint. Both run as root and let Mosquitto drop to user mosquitto, uid/gid 1883 (the
  stand-in pre-creates that user so the Debian package uses it).
- influxdb 1.x: upstream is Debian 12 + InfluxData's 1.11.8 build, `USER influxdb` (uid 1500), an `/entrypoint.sh`
  that runs `/init-influxdb.sh` when INFLUXDB_* init variables are set (a first-start database and users); the
  stand-in is Debian's InfluxDB 1.6.7 as uid 1500 with no entrypoint and no init variables: iotplat creates its
  databases and users over the HTTP API either way and never sets those variables (they would put passwords in
  the environment).
- python (the worker's base): upstream builds CPython 3.13 into /usr/local; the stand-in is Debian 13's python3
  (3.13) in /usr/bin. The worker image finds `python3` on PATH, so both work.
- Grafana has no stand-in: no Debian package exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from iotplat.containers import oci
from iotplat.containers.images import ImageRef, parse_image_ref
from iotplat.containers.oci import ImageConfig, Platform
from iotplat.hosts.image import file_lock
from iotplat.hosts.settings import apt_mirrors

FORMAT = 1  # bump when the build below changes in a way the inputs do not show
CACHE = Path(os.environ.get("IOTPLAT_TEST_IMAGE_DIR", "/var/lib/iotplat/test-images"))
PLATFORM = Platform("linux", "amd64")
SLIM = (  # what Debian's -slim images leave out
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/lintian/*",
)


@dataclass(frozen=True)
class Recipe:
    name: str  # docker.io/...
    familiar: str
    tag: str
    suite: str
    packages: tuple[str, ...]
    config: ImageConfig
    users: tuple[tuple[str, int], ...] = ()  # system users pre-created with fixed ids (name, uid = gid)
    dirs: tuple[tuple[str, int], ...] = ()  # directories created in the image, owned by that uid

    def key(self, mirror: str) -> str:
        inputs = {"format": FORMAT, "recipe": repr(self), "mirror": mirror, "slim": SLIM}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class StandIn:
    recipe: Recipe
    archive: Path
    ref: ImageRef  # name:tag@<digest of the stand-in's manifest>
    config_digest: str


RECIPES = {
    "mosquitto": Recipe(
        "docker.io/library/eclipse-mosquitto", "eclipse-mosquitto", "2.0.11-debian12-standin", "bookworm",
        ("mosquitto",),
        ImageConfig(cmd=("/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"),
                    labels=(("org.iotplat.standin", "Debian 12 mosquitto in place of eclipse-mosquitto"),)),
        users=(("mosquitto", 1883),), dirs=(("/mosquitto/config", 1883), ("/mosquitto/data", 1883),
                                            ("/mosquitto/log", 1883)),
    ),
    "influxdb": Recipe(
        "docker.io/library/influxdb", "influxdb", "1.6.7-debian12-standin", "bookworm", ("influxdb",),
        ImageConfig(user="influxdb", cmd=("influxd",),
                    labels=(("org.iotplat.standin", "Debian 12 influxdb 1.6.7 in place of influxdb:1.x"),)),
        users=(("influxdb", 1500),), dirs=(("/var/lib/influxdb", 1500),),
    ),
    "python": Recipe(
        "docker.io/library/python", "python", "3.13-debian13-standin", "trixie", ("python3", "ca-certificates"),
        ImageConfig(cmd=("python3",), labels=(("org.iotplat.standin", "Debian 13 python3 in place of python:3.13-slim"),)),
    ),
}


def stand_in(which: str) -> StandIn:
    """The stand-in image `which` (mosquitto | influxdb | python), built on first use and cached."""
    recipe = RECIPES[which]
    mirror, _ = apt_mirrors()
    folder = CACHE / recipe.key(mirror)
    meta = folder / "standin.json"
    with file_lock(CACHE / f".{which}.lock", timeout=1800, what=f"stand-in image {which}"):
        if not meta.exists():
            _build(recipe, mirror, folder)
        rec = json.loads(meta.read_text())
    os.utime(folder)  # used: kept by the pruning below
    _prune(keep={p.parent for p in CACHE.glob("*/standin.json") if p.parent.stat().st_mtime > time.time() - 14 * 86400}
           | {folder})
    return StandIn(recipe, folder / "image.tar", parse_image_ref(rec["ref"]), rec["config_digest"])


def variant(which: str, change: str) -> StandIn:
    """The stand-in `which` rebuilt with one label changed (`org.iotplat.standin.variant` = `change`): same name,
    same tag, same layer, a new config and so a new image ID and registry digest -- what a registry serves when an
    image is rebuilt under the same tag, the case pinning by digest exists for. Written from the cached stand-in's
    own blobs (no mmdebstrap run: a second or two), cached by the base's folder and `change`."""
    import tarfile

    base = stand_in(which)
    key = hashlib.sha256(json.dumps({"format": FORMAT, "base": base.archive.parent.name, "change": change}).encode())
    folder = CACHE / key.hexdigest()[:20]
    meta = folder / "standin.json"
    with file_lock(CACHE / f".{which}.lock", timeout=1800, what=f"stand-in image {which}"):
        if not meta.exists():
            staging = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
            try:
                with tarfile.open(base.archive) as tar:
                    def blob(digest: str) -> bytes:
                        member = tar.extractfile(oci.blob_name(digest))
                        assert member is not None
                        return member.read()

                    index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
                    top = json.loads(blob(index["manifests"][0]["digest"]))
                    manifest = json.loads(blob(top["manifests"][0]["digest"])) if "manifests" in top else top
                    config = json.loads(blob(manifest["config"]["digest"]))
                    layers = [oci.Layer(None, d["digest"], diff_id, d["size"], d["mediaType"])
                              for d, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)]
                    image_config = oci.ImageConfig.from_json(config["config"])
                    image_config = ImageConfig(
                        user=image_config.user, entrypoint=image_config.entrypoint, cmd=image_config.cmd,
                        env=image_config.env, working_dir=image_config.working_dir,
                        labels=tuple(sorted({**dict(image_config.labels), "org.iotplat.standin.variant": change}.items())))
                    # the same history (one entry per layer: a label adds no layer)
                    docs = oci.image_documents(layers, image_config, PLATFORM,
                                               history=[h["created_by"] for h in config.get("history") or []])
                    layer_blobs = []
                    for layer in layers:
                        path = staging / layer.digest.split(":", 1)[1]
                        with open(path, "wb") as out:
                            shutil.copyfileobj(tar.extractfile(oci.blob_name(layer.digest)), out)  # type: ignore[misc]
                        layer_blobs.append(oci.ArchiveBlob(layer.digest, layer.size, path=path))
                    oci.save_image(staging / "image.tar", docs, layer_blobs, name=base.recipe.name, tag=base.recipe.tag,
                                   familiar=base.recipe.familiar)
                    for b in layer_blobs:
                        assert b.path is not None
                        b.path.unlink()
                ref = f"{base.recipe.familiar}:{base.recipe.tag}@{docs.digest}"
                (staging / "standin.json").write_text(json.dumps({"ref": ref, "config_digest": docs.config_digest,
                                                                  "recipe": repr(base.recipe), "variant": change},
                                                                 indent=2))
                if folder.exists():
                    shutil.rmtree(folder)
                staging.rename(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        rec = json.loads(meta.read_text())
    os.utime(folder)
    return StandIn(base.recipe, folder / "image.tar", parse_image_ref(rec["ref"]), rec["config_digest"])


def _build(recipe: Recipe, mirror: str, folder: Path) -> None:
    if not shutil.which("mmdebstrap"):
        raise RuntimeError("mmdebstrap is missing: apt-get install mmdebstrap (.ci/run installs it)")
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
    try:
        rootfs = staging / "rootfs.tar"
        hooks = []
        for user, uid in recipe.users:  # before the packages' postinst, which then finds the user
            hooks.append(
                f'echo "{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin" >> "$1/etc/passwd"; '
                f'echo "{user}:x:{uid}:" >> "$1/etc/group"; '
                f'echo "{user}:!:19000::::::" >> "$1/etc/shadow"'
            )
        custom = [f'mkdir -p "$1{d}" && chown {uid}:{uid} "$1{d}"' for d, uid in recipe.dirs]
        custom.append('rm -rf "$1/var/cache/apt" "$1/var/lib/apt/lists" "$1/var/log/"*.log "$1/var/cache/ldconfig/aux-cache"')
        argv = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(recipe.packages)}",
                *(f"--dpkgopt={o}" for o in SLIM),
                *(f"--essential-hook={h}" for h in hooks), *(f"--customize-hook={c}" for c in custom),
                recipe.suite, str(rootfs), f"deb {mirror} {recipe.suite} main"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"mmdebstrap for {recipe.familiar} failed: {proc.stderr[-2000:]}")
        with open(rootfs, "rb") as src:
            layer = oci.compress_layer(src, staging / "layer.tar.gz")
        rootfs.unlink()
        docs = oci.image_documents([layer], recipe.config, PLATFORM,
                                   history=[f"mmdebstrap minbase {recipe.suite} +{','.join(recipe.packages)} (iotplat test stand-in)"])
        oci.save_image(staging / "image.tar", docs, [oci.ArchiveBlob(layer.digest, layer.size, path=layer.path)],
                       name=recipe.name, tag=recipe.tag, familiar=recipe.familiar)
        (staging / "layer.tar.gz").unlink()
        ref = f"{recipe.familiar}:{recipe.tag}@{docs.digest}"
        (staging / "standin.json").write_text(json.dumps({"ref": ref, "config_digest": docs.config_digest,
                                                          "recipe": repr(recipe)}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prune(keep: set[Path]) -> None:
    """Stand-ins not used for two weeks (only the folders this module made: a 20-hex key with a standin.json)."""
    for folder in CACHE.iterdir():
        if folder.is_dir() and re.fullmatch(r"[0-9a-f]{20}", folder.name) and folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # build (or show) every stand-in: python -m tests.support.images
    for which in RECIPES:
        started = time.monotonic()
        image = stand_in(which)
        size = image.archive.stat().st_size
        print(f"{which}: {image.ref} ({size / 1e6:.1f} MB archive, {time.monotonic() - started:.1f} s)")
