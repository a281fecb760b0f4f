"""Bytes <-> messages, with the size limit checked before any parsing work."""

import json
from typing import TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from fleet.protocol.messages import MAX_PAYLOAD_BYTES, DraftMessage, VerdictMessage

M = TypeVar("M", bound=BaseModel)


class ProtocolError(ValueError):
    """A payload that is not a valid message; `code` is short and machine-readable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def encode(message: BaseModel, *, binary: bool) -> bytes:
    """msgpack for the hot path, compact JSON for everything an IoT app reads or writes."""
    data = message.model_dump(mode="json", exclude_none=True)
    if binary:
        return msgpack.packb(data, use_bin_type=True)
    return json.dumps(data, separators=(",", ":")).encode()


def decode_draft(payload: bytes) -> DraftMessage:
    return _validate(DraftMessage, _unpack(payload))


def decode_verdict(payload: bytes) -> VerdictMessage:
    return _validate(VerdictMessage, _unpack(payload))


def decode_json(model: type[M], payload: bytes) -> M:
    _check_size(payload)
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"not JSON: {exc}") from exc
    return _validate(model, data)


def _unpack(payload: bytes) -> object:
    _check_size(payload)
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError("malformed", f"not msgpack: {type(exc).__name__}: {exc}") from exc


def _check_size(payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")


def _validate(model: type[M], data: object) -> M:
    if not isinstance(data, dict):
        raise ProtocolError("malformed", f"expected an object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise ProtocolError("invalid", f"{where}: {first['msg']}") from exc
