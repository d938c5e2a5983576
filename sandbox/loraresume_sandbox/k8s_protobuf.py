"""Decoding the few protobuf request bodies kubectl sends, so its imperative commands work.

kubectl's typed commands (`kubectl create secret generic …`, `create configmap`,
`create namespace`) send `application/vnd.kubernetes.protobuf` bodies and there is no
content negotiation for request bodies. The sandbox answers in JSON (kubectl accepts
it) and decodes these kinds from the wire format with their field numbers from
k8s.io/api's generated.proto; any other kind is refused with 415.
"""

from __future__ import annotations

import base64
from typing import Any

from .k8s_errors import ApiError

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints/fixed, bytes for length-delimited."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 1:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, value))
    return out


def _text(value: int | bytes) -> str:
    assert isinstance(value, bytes)
    return value.decode()


def _map_entry(value: int | bytes, as_bytes: bool = False) -> tuple[str, Any]:
    assert isinstance(value, bytes)
    entry = dict(_fields(value))
    key = _text(entry.get(1, b""))
    raw = entry.get(2, b"")
    assert isinstance(raw, bytes)
    return key, base64.b64encode(raw).decode() if as_bytes else raw.decode()


def _object_meta(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    names = {1: "name", 2: "generateName", 3: "namespace", 6: "resourceVersion"}
    for number, value in _fields(data):
        if number in names:
            if _text(value):  # gogo-protobuf writes empty strings too; absent means unset
                meta[names[number]] = _text(value)
        elif number == 11:
            meta.setdefault("labels", {}).update([_map_entry(value)])
        elif number == 12:
            meta.setdefault("annotations", {}).update([_map_entry(value)])
        elif number == 14:
            meta.setdefault("finalizers", []).append(_text(value))
    return meta


def _secret(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {}}
    for number, value in _fields(data):
        if number == 1:
            assert isinstance(value, bytes)
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            obj.setdefault("data", {}).update([_map_entry(value, as_bytes=True)])
        elif number == 3 and _text(value):
            obj["type"] = _text(value)
        elif number == 4:
            obj.setdefault("stringData", {}).update([_map_entry(value)])
        elif number == 5:
            obj["immutable"] = bool(value)
    return obj


def _configmap(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {}}
    for number, value in _fields(data):
        if number == 1:
            assert isinstance(value, bytes)
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            obj.setdefault("data", {}).update([_map_entry(value)])
        elif number == 3:
            obj.setdefault("binaryData", {}).update([_map_entry(value, as_bytes=True)])
        elif number == 4:
            obj["immutable"] = bool(value)
    return obj


def _namespace(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {}}
    for number, value in _fields(data):
        if number == 1:
            assert isinstance(value, bytes)
            obj["metadata"] = _object_meta(value)
    return obj


_DECODERS = {"Secret": _secret, "ConfigMap": _configmap, "Namespace": _namespace}


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf-encoded built-in object as JSON-like dict; 415 for kinds the sandbox cannot decode."""
    if not body.startswith(MAGIC):
        raise ApiError(400, "BadRequest", "protobuf body without the k8s envelope")
    try:
        envelope = dict(_fields(body[len(MAGIC) :]))
        type_meta = dict(_fields(envelope.get(1, b"")))  # type: ignore[arg-type]
        api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
        decoder = _DECODERS.get(kind)
        if decoder is None:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the sandbox's API emulator decodes protobuf only for {', '.join(_DECODERS)}, not {kind}: "
                "send JSON (e.g. `kubectl create … --dry-run=client -o yaml | kubectl apply -f -`)",
            )
        raw = envelope.get(2, b"")
        assert isinstance(raw, bytes)
        obj = decoder(raw)
    except (ValueError, IndexError, AssertionError, UnicodeDecodeError) as exc:
        raise ApiError(400, "BadRequest", f"the protobuf request body could not be decoded: {exc}") from exc
    return {"apiVersion": api_version, "kind": kind, **obj}


def decode_delete_options(body: bytes) -> dict[str, Any]:
    """The parts of a protobuf DeleteOptions the emulator honours (grace period, propagation)."""
    try:
        envelope = dict(_fields(body[len(MAGIC) :])) if body.startswith(MAGIC) else {}
        raw = envelope.get(2, b"")
        assert isinstance(raw, bytes)
        options: dict[str, Any] = {}
        for number, value in _fields(raw):
            if number == 1 and isinstance(value, int):
                options["gracePeriodSeconds"] = value if value < 1 << 63 else value - (1 << 64)
            elif number == 4:
                options["propagationPolicy"] = _text(value)
        return options
    except (ValueError, IndexError, AssertionError, UnicodeDecodeError):
        return {}
