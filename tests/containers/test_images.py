"""Image references: the grammar Docker parses, a digest always required, one line with a hint for every refusal."""

from __future__ import annotations

import re

import pytest

from iotplat.containers.images import (
    DEFAULT_IMAGES,
    ImageRefError,
    default_image,
    parse_image_ref,
    resolve_image,
)
from iotplat.errors import ExitCode

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "domain", "path", "familiar"),
    [
        (f"eclipse-mosquitto:2.0.22@{D}", "docker.io", "library/eclipse-mosquitto", "eclipse-mosquitto"),
        (f"grafana/grafana-oss:12.0.0@{D}", "docker.io", "grafana/grafana-oss", "grafana/grafana-oss"),
        (f"docker.io/library/influxdb:1.11.8@{D}", "docker.io", "library/influxdb", "influxdb"),
        (f"registry.example.com:5000/team/app:v1.2_3@{D}", "registry.example.com:5000", "team/app",
         "registry.example.com:5000/team/app"),
        (f"localhost/app:x@{D}", "localhost", "app", "localhost/app"),
        (f"a__b/c-d.e--f:t@{D}", "docker.io", "a__b/c-d.e--f", "a__b/c-d.e--f"),
    ],
)
def test_valid_references(text, domain, path, familiar):
    ref = parse_image_ref(text)
    assert (ref.domain, ref.path, ref.familiar_name) == (domain, path, familiar)
    assert ref.digest == D
    assert str(ref) == f"{familiar}:{ref.tag}@{D}"
    assert ref.pinned == f"{familiar}@{D}"
    assert parse_image_ref(str(ref)) == ref  # round trip


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        ("eclipse-mosquitto:2.0.22", "has no digest", "docker buildx imagetools inspect eclipse-mosquitto:2.0.22"),
        ("eclipse-mosquitto", "has no digest", "eclipse-mosquitto:TAG@sha256:<digest>"),
        (f"eclipse-mosquitto@{D}", "has no tag", "eclipse-mosquitto:1.2.3@sha256:abab"),
        ("eclipse-mosquitto:2@sha512:" + "a" * 128, "digest algorithm 'sha512' is not supported", "64 lower-case"),
        ("eclipse-mosquitto:2@sha256:" + "A" * 64, "not in canonical form", "64 lower-case"),
        ("eclipse-mosquitto:2@sha256:abc", "is not a sha256 digest", "64 lower-case"),
        (f"Eclipse-Mosquitto:2@{D}", "repository name 'Eclipse-Mosquitto' is invalid (repository names are lower case)",
         "lower-case letters"),
        (f"eclipse-mosquitto:-bad@{D}", "tag '-bad' is invalid", "128 letters"),
        (f"eclipse-mosquitto:{'x' * 129}@{D}", "is invalid", "128"),
        (f"bad_host.-x:5000/app:1@{D}", "registry 'bad_host.-x:5000' is not a host name", "REGISTRY[:PORT]/PATH"),
        (f"a//b:1@{D}", "repository name 'a//b' is invalid", ""),
        ("", "is empty", ""),
    ],
)
def test_refused_references_say_how_to_fix(text, message, hint):
    with pytest.raises(ImageRefError) as info:
        parse_image_ref(text)
    err = info.value
    assert message in err.message
    assert hint in err.hint
    assert err.exit_code == ExitCode.INVALID
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    "hostile",
    [
        f"eclipse-mosquitto:2@{D}\n",
        f"eclipse-mosquitto:2@{D} --privileged",
        f"eclipse-mosquitto:2@{D};rm",
        f"eclipse-mosquitto:2\n@{D}",
        f"eclipse-mosquitto:2@{D}\x00",
        f"eclipse-mosquitto:2%n@{D}",
        f"eclipse-mosquitto:2$(id)@{D}",
        f"eclipse\u2011mosquitto:2@{D}",  # a non-ASCII hyphen
        f"-eclipse-mosquitto:2@{D}",
        f"eclipse-mosquitto:2@{D}@{D}",
        f"../etc/passwd:2@{D}",
        f"eclipse-mosquitto:2@{D[:-1]}\u0663",  # an Arabic-Indic digit: Python's \d would take it
    ],
)
def test_hostile_references_are_refused(hostile):
    with pytest.raises(ImageRefError):
        parse_image_ref(hostile)


def test_every_accepted_field_is_closed():
    """What a parsed reference hands to unit files and command lines is plain ASCII without specials."""
    ref = parse_image_ref(f"registry.example.com:5000/team/app:v1.2_3@{D}")
    for value in (ref.name, ref.tagged, ref.pinned, str(ref), ref.tag, ref.digest):
        assert re.fullmatch(r"[A-Za-z0-9._:/@-]+", value), value


def test_defaults_parse_and_name_their_source():
    for key, image in DEFAULT_IMAGES.items():
        assert image.source, key
        if image.digest is None:
            continue
        ref = image.ref()
        assert ref.tag == image.tag
        assert "repo-info" in image.source and re.search(r"@ [0-9a-f]{40}", image.source)
    assert default_image("influxdb", 2).tag.startswith("2.")
    assert default_image("influxdb", 1).tag.startswith("1.")


def test_a_default_without_digest_is_refused_with_a_hint():
    with pytest.raises(ImageRefError) as info:
        resolve_image("grafana", None)
    assert "no verified digest" in info.value.message
    assert "grafana/grafana-oss:12.0.0@sha256:<digest>" in info.value.hint
    # a pinned reference in the spec wins over the default
    assert resolve_image("grafana", f"grafana/grafana-oss:12.0.0@{D}").digest == D
