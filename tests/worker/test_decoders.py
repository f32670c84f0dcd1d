"""Decoders and line-protocol encoding; hypothesis fuzzing shows the parsers only ever raise Rejected."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotplat.worker.config import FieldSpec, LimitsConfig, Subscription, TimestampSpec
from iotplat.worker.decoders import (
    JsonDecoder,
    LineProtocolDecoder,
    RawDecoder,
    available_decoders,
    load_decoder_class,
)
from iotplat.worker.lineproto import Point, Reason, Rejected, encode_point, excerpt

LIMITS = LimitsConfig(max_payload=65536, max_json_depth=8, max_fields=50)
NOW = time.time_ns()
TAGS = {"device": "dev 1,a=b"}


def sub(fmt="json", fields=None, ts=("ts", "ms"), options=None) -> Subscription:
    fs = {k: FieldSpec(k, t, p or k, r) for k, (t, p, r) in (fields or {}).items()}
    return Subscription("s", "devices/{device}/telemetry", 1, fmt, "telemetry", {}, TimestampSpec(*ts) if ts else None,
                        fs, options or {})


def decode(dec, payload: bytes) -> list[bytes]:
    return dec.decode(payload, dict(TAGS), NOW)


def reason_of(dec, payload: bytes) -> Reason:
    with pytest.raises(Rejected) as ei:
        decode(dec, payload)
    return ei.value.reason


def test_entry_points_are_registered():
    eps = available_decoders()
    assert {"json", "line", "raw"} <= set(eps)
    assert load_decoder_class("json") is JsonDecoder
    assert load_decoder_class("line") is LineProtocolDecoder
    assert load_decoder_class("raw") is RawDecoder
    with pytest.raises(LookupError, match="no decoder 'nope'"):
        load_decoder_class("nope")


def test_json_declared_fields_types_and_device_timestamp():
    d = JsonDecoder(sub(fields={"temp": ("float", "env.t", False), "seq": ("int", None, True),
                                "ok": ("bool", None, False), "fw": ("string", "meta.fw", False)}), LIMITS)
    ts_ms = NOW // 1_000_000 - 5000
    out = decode(d, json.dumps({"ts": ts_ms, "seq": 7, "env": {"t": 21}, "ok": True,
                                "meta": {"fw": 'v1 "beta"'}}).encode())
    assert out == [b'telemetry,device=dev\\ 1\\,a\\=b temp=21.0,seq=7i,ok=true,fw="v1 \\"beta\\"" '
                   + str(ts_ms * 1_000_000).encode()]
    # an integral float is accepted for an int field; a missing optional field is skipped
    assert decode(d, b'{"seq": 3.0}')[0].startswith(b"telemetry,device=dev\\ 1\\,a\\=b seq=3i ")


def test_json_same_message_same_line():
    """A redelivery must produce the identical point (same timestamp) so InfluxDB overwrites the row."""
    d = JsonDecoder(sub(fields={"v": ("float", None, False)}), LIMITS)
    p = b'{"ts": 1700000000123, "v": 1.5}'
    assert decode(d, p) == d.decode(p, dict(TAGS), NOW + 10**9)


def test_json_without_declared_fields_flattens_numbers_as_float():
    d = JsonDecoder(sub(), LIMITS)
    out = decode(d, b'{"ts": 1700000000000, "a": 1, "n": {"b": 2.5, "c": [true, "x"]}, "z": null}')
    assert out == [b'telemetry,device=dev\\ 1\\,a\\=b a=1.0,n_b=2.5,n_c_0=true,n_c_1="x" 1700000000000000000']


@pytest.mark.parametrize("payload,reason", [
    (b"   ", Reason.EMPTY_PAYLOAD),
    (b"\xff\xfe{}", Reason.INVALID_UTF8),
    (b'{"seq": 1', Reason.INVALID_JSON),
    (b'{"seq": 1} trailing', Reason.INVALID_JSON),
    (b"[1, 2]", Reason.TYPE_MISMATCH),
    (b'{"seq": NaN}', Reason.NON_FINITE),
    (b'{"seq": 1, "temp": Infinity}', Reason.NON_FINITE),
    (b'{"seq": 1, "temp": 1e999}', Reason.NON_FINITE),
    (b'{"seq": 99999999999999999999}', Reason.OUT_OF_RANGE),
    (b'{"seq": "1"}', Reason.TYPE_MISMATCH),
    (b'{"seq": 1.5}', Reason.TYPE_MISMATCH),
    (b'{"seq": true}', Reason.TYPE_MISMATCH),
    (b'{"temp": 1.0}', Reason.MISSING_FIELD),
    (b'{"seq": 1, "ts": "yesterday"}', Reason.BAD_TIMESTAMP),
    (b'{"seq": 1, "ts": -5}', Reason.BAD_TIMESTAMP),
    (b'{"seq": 1, "ts": 99999999999999999}', Reason.BAD_TIMESTAMP),
    (b'{"seq": 1, "ts": 4102444800000}', Reason.BAD_TIMESTAMP),  # year 2100: too far in the future
    (b'{"seq": 1, "a": ' + b"[" * 100 + b"]" * 100 + b"}", Reason.TOO_COMPLEX),
    (b'{"seq": 1' + b"9" * 5000 + b"}", Reason.OUT_OF_RANGE),
    (b'{"seq": 1, "name": "a\\nb"}', Reason.INVALID_CHAR),
])
def test_json_rejections(payload, reason):
    d = JsonDecoder(sub(fields={"seq": ("int", None, True), "temp": ("float", None, False),
                                "name": ("string", None, False)}), LIMITS)
    assert reason_of(d, payload) is reason


def test_json_too_many_fields():
    d = JsonDecoder(sub(), LIMITS)
    doc = {f"k{i}": i for i in range(60)}
    assert reason_of(d, json.dumps(doc).encode()) is Reason.TOO_COMPLEX


def test_rfc3339_timestamps():
    d = JsonDecoder(sub(fields={"v": ("float", None, False)}, ts=("time", "rfc3339")), LIMITS)
    out = decode(d, b'{"time": "2024-05-01T12:00:00.250Z", "v": 1}')
    assert out[0].endswith(b" 1714564800250000000")
    assert reason_of(d, b'{"time": "2024-05-01T12:00:00", "v": 1}') is Reason.BAD_TIMESTAMP


def test_line_protocol_pass_through_adds_topic_tags():
    d = LineProtocolDecoder(sub("line", ts=None, options={"precision": "ms"}), LIMITS)
    out = d.decode(b'cpu,host=a usage=0.5,n=3i,s="x y" 1700000000000\nmem free=1\n', {"device": "d1"}, NOW)
    lines = [encode_point(p, NOW) for p in out]
    assert lines[0] == b'cpu,device=d1,host=a usage=0.5,n=3i,s="x y" 1700000000000000000'
    assert lines[1] == b"mem,device=d1 free=1.0 " + str(NOW).encode()


@pytest.mark.parametrize("payload,reason", [
    (b"cpu usage=NaN", Reason.NON_FINITE),
    (b"cpu usage=", Reason.INVALID_LINE),
    (b"cpu", Reason.INVALID_LINE),
    (b"cpu v=1 notatime", Reason.BAD_TIMESTAMP),
    (b"cpu v=99999999999999999999i", Reason.OUT_OF_RANGE),
    (b'cpu s="open', Reason.INVALID_LINE),
    (b"\n\n", Reason.EMPTY_PAYLOAD),
])
def test_line_protocol_rejections(payload, reason):
    d = LineProtocolDecoder(sub("line", ts=None), LIMITS)
    assert reason_of(d, payload) is reason


def test_raw_decoder():
    d = RawDecoder(sub("raw", ts=None), LIMITS)
    assert decode(d, b" 21.5\n")[0].startswith(b"telemetry,device=dev\\ 1\\,a\\=b value=21.5 ")
    assert reason_of(d, b"nan") is Reason.NON_FINITE
    assert reason_of(d, b"abc") is Reason.TYPE_MISMATCH
    di = RawDecoder(sub("raw", ts=None, fields={"level": ("int", None, False)}), LIMITS)
    assert b" level=42i " in decode(di, b"42")[0]


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="unknown option"):
        JsonDecoder(sub(options={"colour": "red"}), LIMITS)
    with pytest.raises(ValueError, match="precision"):
        LineProtocolDecoder(sub("line", options={"precision": "h"}), LIMITS)


def test_encode_point_checks_plugin_output():
    assert encode_point(Point("m", {"t": "a b"}, {"v": 1.0, "i": 2, "s": 'q"'}, 5), 0) == \
        b'm,t=a\\ b v=1.0,i=2i,s="q\\"" 5'
    for bad, reason in [(Point("m", {}, {}), Reason.MISSING_FIELD),
                        (Point("m", {}, {"v": float("nan")}), Reason.NON_FINITE),
                        (Point("m", {}, {"v": 2**64}), Reason.OUT_OF_RANGE),
                        (Point("m", {}, {"v": [1]}), Reason.TYPE_MISMATCH),
                        (Point("m\n", {}, {"v": 1}), Reason.INVALID_CHAR),
                        (Point("m", {}, {"v": 1}, time_ns=2**70), Reason.BAD_TIMESTAMP)]:
        with pytest.raises(Rejected) as ei:
            encode_point(bad, 0)
        assert ei.value.reason is reason


def test_excerpt_is_bounded_and_escaped():
    e = excerpt(b"ok\x00\n\\\xff" + b"x" * 5000, 64)
    assert e.startswith("ok\\x00\\x0a\\\\\\xff")
    assert len(e) <= 64 + 3 and e.endswith("...")
    assert "\n" not in e


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=40)


def _all_decoders():
    return [JsonDecoder(sub(fields={"seq": ("int", None, True), "temp": ("float", "a.b", False)}), LIMITS),
            JsonDecoder(sub(), LIMITS),
            LineProtocolDecoder(sub("line", ts=None), LIMITS),
            RawDecoder(sub("raw", ts=None), LIMITS)]


DECODERS = _all_decoders()


def _check(payload: bytes) -> None:
    # CPU time of this thread, not wall time: the bound catches a pathological (backtracking) decode of a short
    # payload, and must not trip because two cores are shared with servers and other tests.
    for d in DECODERS:
        t = time.thread_time()
        try:
            out = d.decode(payload, {"device": "d"}, NOW)
        except Rejected as r:
            assert isinstance(r.reason, Reason)
        else:
            for item in out:
                line = item if isinstance(item, bytes) else encode_point(item, NOW)
                assert b"\n" not in line
        assert time.thread_time() - t < 0.5


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_bytes_only_rejected(payload):
    _check(payload)


@FUZZ
@given(json_values)
def test_fuzz_json_documents_only_rejected(doc):
    _check(json.dumps(doc, allow_nan=True).encode())


@FUZZ
@given(st.text(alphabet=st.sampled_from(list('cpu,=" \\\n0123456789.eEif-tTrRuU#xyz')), max_size=120))
def test_fuzz_line_protocol_only_rejected(text):
    _check(text.encode())


# --- the generated JSON fast path agrees with the generic decoder --------------------------------

FAST_SUBS = [
    sub(fields={"seq": ("int", None, True), "temp": ("float", None, False)}),
    sub(fields={"t": ("float", "env.t", True), "ok": ("bool", None, False), "fw": ("string", "meta.fw", False)},
        ts=("time", "s")),
    sub(fields={"n": ("int", None, False), "s": ("string", None, True)}, ts=("at", "rfc3339")),
    sub(fields={"v": ("float", None, True)}, ts=None),
    sub(fields={"v": ("int", "a.0", True), "x y,z=": ("bool", None, False)}, ts=("m.ts", "us")),
]
FAST_DECODERS = [JsonDecoder(s, LIMITS) for s in FAST_SUBS]
scalar = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
          | st.sampled_from(["2026-01-02T03:04:05Z", "2026-01-02T03:04:05", "x", "a\nb"]))
keys = st.sampled_from(["seq", "temp", "ts", "t", "env", "ok", "fw", "meta", "n", "s", "at", "time", "v", "a", "m",
                        "x y,z="])
docs = st.recursive(scalar, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(keys, ch, max_size=5),
                    max_leaves=20)


def _outcome(fn, payload):
    try:
        return fn(payload, dict(TAGS), NOW)
    except Rejected as r:
        return r.reason


@FUZZ
@given(st.dictionaries(keys, docs, max_size=7), st.sampled_from(["", " ", "\n", "x", "}"]))
def test_json_fast_path_agrees_with_generic_decoder(doc, tail):
    """Whatever the fast path returns equals the generic decoder's line; when it declines (None), the
    generic decoder alone decides (including every dead-letter reason)."""
    payload = (json.dumps(doc, allow_nan=True) + tail).encode()
    for dec in FAST_DECODERS:
        line = dec.fast(payload, NOW, dec.line_prefix(dict(TAGS)))
        if line is not None:
            assert [line] == _outcome(dec.decode_generic, payload)
        assert _outcome(dec.decode, payload) == _outcome(dec.decode_generic, payload)


def test_json_fast_path_takes_the_ordinary_messages():
    """The fast path is not a no-op: typical messages go through it, with the generic decoder's bytes."""
    ts_ms = NOW // 1_000_000 - 5000
    cases = [
        (0, {"ts": ts_ms, "seq": 7, "temp": 21.5}), (0, {"ts": ts_ms, "seq": -1, "temp": 3}),
        (1, {"time": ts_ms // 1000, "env": {"t": 1e-3}, "ok": False, "meta": {"fw": 'v"1\\'}}),
        (2, {"at": "2026-01-02T03:04:05+01:00", "n": 2 ** 63 - 1, "s": "a b"}),
        (3, {"v": -0.0, "other": [1, {"x": 2}]}),
        (4, {"m": {"ts": ts_ms * 1000}, "a": [5], "x y,z=": True}),
    ]
    for i, doc in cases:
        dec = FAST_DECODERS[i]
        payload = json.dumps(doc).encode()
        line = dec.fast(payload, NOW, dec.line_prefix(dict(TAGS)))
        assert line is not None, (i, doc)
        assert [line] == dec.decode_generic(payload, dict(TAGS), NOW)
    # deeper than limits.max_json_depth (8 here): the generic decoder's, which rejects it
    deep = json.dumps({"v": 1.5, "other": [[[[[[[[1]]]]]]]]}).encode()
    assert FAST_DECODERS[3].fast(deep, NOW, FAST_DECODERS[3].line_prefix(dict(TAGS))) is None
    assert reason_of(FAST_DECODERS[3], deep) == Reason.TOO_COMPLEX
    assert JsonDecoder(sub(), LIMITS).fast is None  # undeclared fields: the generic decoder flattens
