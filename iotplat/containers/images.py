"""Image references: `name:tag@sha256:<64 hex>`, and the images iotplat pins by default.

What the digest means (docs/containers.md has the whole argument):

- It is the **registry digest**: the sha256 of the manifest (or of the multi-platform index) exactly as a registry
  serves it. That is what `@sha256:` means in every reference Docker, containerd, podman and skopeo parse, what
  `docker pull NAME@sha256:...` checks the download against, what Docker Hub and `docker buildx imagetools inspect`
  show, and one value for every architecture when it names an index.
- It is **not** the image ID (`docker image inspect --format '{{.Id}}'`, the sha256 of the image's config): that
  one cannot be pulled by, differs per architecture, and is what a host shows after `docker load`.
- An archive is checked against the registry digest on the controller by walking the archive's own blobs
  (iotplat/containers/archive.py): the digest must be one of its blobs, its manifest for the host's platform
  leads to the config, and the config's digest is the image ID the host must show after loading. So both digests
  are checked, each where it can be: the registry digest before loading, the image ID after.

A tag is required next to the digest: hosts tag the loaded image with it (`docker load` needs a name), and people
read `eclipse-mosquitto:2.0.22`, not a hash. The digest decides what runs; the tag is never trusted.

Hand-written because no maintained Python library implements the reference grammar of distribution/reference
(the one Docker parses); it is a handful of regular expressions, all matched against the whole string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from iotplat.errors import InvalidInput

DEFAULT_DOMAIN = "docker.io"
OFFICIAL_PREFIX = "library/"
DIGEST_ALGORITHM = "sha256"
NAME_MAX = 255  # distribution/reference: a repository name (domain + path) has at most 255 characters

# The grammar of distribution/reference (reference.go), restricted to ASCII on purpose: Python's \w is Unicode.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]{{1,5}})?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_HEX64 = r"[a-f0-9]{64}"

PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
DOMAIN_RE = re.compile(_DOMAIN)
TAG_RE = re.compile(_TAG)
DIGEST_RE = re.compile(rf"{DIGEST_ALGORITHM}:{_HEX64}")
_ANY_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Za-z=_-]+")


class ImageRefError(InvalidInput):
    """An image reference iotplat cannot use. `message` and `hint` are separate so the spec validator can report
    them as `FILE:LINE:COL: path: message (hint)`; str() is one line for everything else."""

    def __init__(self, value: str, message: str, hint: str = "") -> None:
        self.value = value
        self.message = message
        self.hint = hint
        super().__init__(f"image {value!r}: {message}" + (f" ({hint})" if hint else ""))


def is_digest(text: str) -> bool:
    """True for `sha256:` and 64 lower-case hex digits, the only digests iotplat accepts (OCI's canonical form)."""
    return DIGEST_RE.fullmatch(text) is not None


@dataclass(frozen=True, order=True)
class ImageRef:
    """A parsed, closed image reference. Every field matches its grammar over the whole string, so any of the
    strings below may go into a unit file, a command line or a JSON document unquoted."""

    domain: str  # "docker.io" when the reference names none
    path: str  # "library/eclipse-mosquitto" (official images get "library/" like Docker does)
    tag: str
    digest: str  # sha256:<64 hex>: the registry digest (manifest or index)

    @property
    def name(self) -> str:
        """Fully qualified repository: docker.io/library/eclipse-mosquitto."""
        return f"{self.domain}/{self.path}"

    @property
    def familiar_name(self) -> str:
        """The short form Docker prints: eclipse-mosquitto, grafana/grafana-oss, registry.example:5000/x."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        return self.path.removeprefix(OFFICIAL_PREFIX)

    @property
    def tagged(self) -> str:
        """name:tag, what `docker load` tags the image with (the archive's RepoTags)."""
        return f"{self.familiar_name}:{self.tag}"

    @property
    def pinned(self) -> str:
        """name@digest: what a host with registry access pulls, and what it runs after such a pull."""
        return f"{self.familiar_name}@{self.digest}"

    @property
    def short_digest(self) -> str:
        return self.digest.split(":", 1)[1][:12]

    def __str__(self) -> str:
        return f"{self.familiar_name}:{self.tag}@{self.digest}"


def parse_image_ref(text: str) -> ImageRef:
    """Parse `[domain/]path:tag@sha256:<64 hex>`; anything else raises ImageRefError saying how to fix it."""
    if not isinstance(text, str) or not text:
        raise ImageRefError(str(text), "is empty", "write NAME:TAG@sha256:<digest>, e.g. eclipse-mosquitto:2.0.22@sha256:...")
    if not text.isprintable() or any(ch.isspace() for ch in text) or not text.isascii():
        raise ImageRefError(text, "holds spaces, control or non-ASCII characters",
                            "an image reference is NAME:TAG@sha256:<digest> in plain ASCII")
    name_tag, at, digest = text.partition("@")
    if not at:
        name, tag = _split_tag(name_tag)
        shown = f"{name}:{tag}" if tag else name
        raise ImageRefError(
            text, "has no digest: a tag can be moved to other content, so iotplat runs images by digest only",
            f"find the digest with `docker buildx imagetools inspect {shown}` or `skopeo inspect --format "
            f"'{{{{.Digest}}}}' docker://{shown}`, then write {shown if tag else name + ':TAG'}@sha256:<digest>",
        )
    if not DIGEST_RE.fullmatch(digest):
        if _ANY_DIGEST_RE.fullmatch(digest) and not digest.startswith(f"{DIGEST_ALGORITHM}:"):
            message = f"digest algorithm {digest.split(':', 1)[0]!r} is not supported"
        elif digest.startswith(f"{DIGEST_ALGORITHM}:") and re.fullmatch(r"sha256:[A-Fa-f0-9]{64}", digest):
            message = "digest is not in canonical form (lower-case hex)"
        else:
            message = f"{digest!r} is not a sha256 digest"
        raise ImageRefError(text, message, "the digest is sha256: followed by 64 lower-case hex digits")
    name, tag = _split_tag(name_tag)
    if not tag:
        raise ImageRefError(
            text, "has no tag",
            f"write the tag the digest belongs to, e.g. {name}:1.2.3@{digest[:15]}...: hosts tag the loaded image "
            "with it (the digest still decides what runs)",
        )
    if not TAG_RE.fullmatch(tag):
        raise ImageRefError(text, f"tag {tag!r} is invalid",
                            "a tag is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    domain, path = _split_domain(name)
    if domain is not None and not DOMAIN_RE.fullmatch(domain):
        raise ImageRefError(text, f"registry {domain!r} is not a host name with an optional port",
                            "write REGISTRY[:PORT]/PATH, e.g. registry.example.com:5000/team/app")
    if not PATH_RE.fullmatch(path):
        lower = "" if path == path.lower() else " (repository names are lower case)"
        raise ImageRefError(text, f"repository name {path!r} is invalid{lower}",
                            "use lower-case letters, digits and '.', '_', '-' between them, with '/' between parts")
    domain = domain or DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    if len(f"{domain}/{path}") > NAME_MAX:
        raise ImageRefError(text, f"repository name is longer than {NAME_MAX} characters")
    return ImageRef(domain=domain, path=path, tag=tag, digest=digest)


def _split_tag(name_tag: str) -> tuple[str, str]:
    """(name, tag): the tag follows the last ':' after the last '/' (a ':' before it belongs to a registry port)."""
    slash = name_tag.rfind("/")
    colon = name_tag.rfind(":")
    if colon > slash:
        return name_tag[:colon], name_tag[colon + 1:]
    return name_tag, ""


def _split_domain(name: str) -> tuple[str | None, str]:
    """Docker's rule: the first component is a registry when it holds '.' or ':' or is `localhost`."""
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    if first == "docker.io" or first == "index.docker.io":
        return DEFAULT_DOMAIN, rest
    return None, name


# --- iotplat's default images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefaultImage:
    """An upstream image iotplat uses when the spec names none. `digest` is None when iotplat ships no digest it
    can justify: such a default is refused with a hint to pin one (never run by tag)."""

    service: str  # broker | influxdb1 | influxdb2 | grafana | worker-base
    name: str  # familiar name
    tag: str
    digest: str | None
    source: str  # where the digest was read, so a reviewer can check it
    user: str  # the user the upstream image runs its service as (uid:gid), see docs/containers.md

    @property
    def written(self) -> str:
        return f"{self.name}:{self.tag}" + (f"@{self.digest}" if self.digest else "")

    def ref(self) -> ImageRef:
        if self.digest is None:
            raise ImageRefError(
                self.written, f"iotplat ships no verified digest for its default {self.service} image",
                f"pin one in the spec: {self.name}:{self.tag}@sha256:<digest> (`docker buildx imagetools inspect "
                f"{self.name}:{self.tag}` prints it)",
            )
        return parse_image_ref(self.written)


_REPO_INFO = "docker-library/repo-info"
DEFAULT_IMAGES: dict[str, DefaultImage] = {
    # The official images' registry digests as Docker's official-images tooling records them for every tag
    # (docker-library/repo-info, repos/<image>/remote/<tag>.md, "docker pull NAME@sha256:..." at the top: the
    # multi-platform OCI index). Read without registry access; `iotplat` checks them against every archive.
    "broker": DefaultImage(
        "broker", "eclipse-mosquitto", "2.0.22",
        "sha256:05b5c328c11046613c4b8137b27021c15342c9fc90ae9c2f4750ed3ece5967bd",
        f"{_REPO_INFO} repos/eclipse-mosquitto/remote/2.0.22.md @ 7356dc9aa9051d57187ce75604441314637bbca9 "
        "(index; linux/amd64 manifest sha256:54c90ecc78645241b6aa272b2a5ac8fc20b0eaf02cc4dd431c0cc8d2fd4447dd)",
        user="1883:1883",  # adduser -u 1883 in its Dockerfile; mosquitto drops root to it itself
    ),
    "influxdb1": DefaultImage(
        "influxdb1", "influxdb", "1.11.8",
        "sha256:9d1a551edbbc38321771b4fd1753d98081f3035e78a6b9c7e738949eceac06eb",
        f"{_REPO_INFO} repos/influxdb/remote/1.11.8.md @ 0b5756772b1566057e3dee24ea2e6108d755397c "
        "(index; linux/amd64 manifest sha256:2cb8469c1f6b89e0fb8bb5e21837ecbbeac889ebb91e42f56e9c818264241d14)",
        user="1500:1500",  # USER influxdb, adduser --uid 1500
    ),
    "influxdb2": DefaultImage(
        "influxdb2", "influxdb", "2.9.1",
        "sha256:05d6fb735bc22449c401094d42846123a24e3325d3a6e092242a45bfd68fff21",
        f"{_REPO_INFO} repos/influxdb/remote/2.9.1.md @ 0b5756772b1566057e3dee24ea2e6108d755397c "
        "(index; linux/amd64 manifest sha256:a889899fb7aae174bc9ef493d495ced98153d931bae3f41528b7f80d5b20c465)",
        user="1000:1000",  # useradd --uid=1000; its entrypoint drops root to it
    ),
    # Not an official image, so repo-info does not record it, and no registry is reachable from where iotplat was
    # written: there is no digest iotplat can justify. A spec that runs Grafana in a container pins its own.
    "grafana": DefaultImage(
        "grafana", "grafana/grafana-oss", "12.0.0", None,
        "none: pin grafana/grafana-oss:<tag>@sha256:<digest> in the spec", user="472:0",
    ),
    # The base of the worker image iotplat builds (iotplat/containers/worker_image.py).
    "worker-base": DefaultImage(
        "worker-base", "python", "3.13-slim-trixie",
        "sha256:9662417aace5ae7b8e2609cce472b72a8958e134ba372808abe9cc1a0c0125e6",
        f"{_REPO_INFO} repos/python/remote/3.13-slim-trixie.md @ 2986dca3a80cb11b70fc4599941096374ea9e509 "
        "(index; linux/amd64 manifest sha256:69e18bd8d831d88e0ef70239dc7771ab7c28bc296ae78ac75cde71e60aa4434f)",
        user="0:0",  # the base runs as root; the worker image sets its own non-root user
    ),
}


def default_image(service: str, influxdb_version: int = 1) -> DefaultImage:
    """The default image of a service (`influxdb` picks 1.x or 2.x by the spec's influxdb.version)."""
    key = f"influxdb{influxdb_version}" if service == "influxdb" else service
    try:
        return DEFAULT_IMAGES[key]
    except KeyError:
        raise ImageRefError(service, "has no default image", f"known: {', '.join(sorted(DEFAULT_IMAGES))}") from None


def resolve_image(service: str, written: str | None, influxdb_version: int = 1) -> ImageRef:
    """The image a service runs: the spec's reference when it has one, else iotplat's default (refused when that
    default has no digest)."""
    if written:
        return parse_image_ref(written)
    return default_image(service, influxdb_version).ref()
