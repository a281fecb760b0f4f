"""The wire protocol between boards, verification servers and IoT apps (see docs/protocol.md)."""

from fleet.protocol.codec import ProtocolError, decode_draft, decode_json, decode_verdict, encode
from fleet.protocol.messages import (
    PROTOCOL_VERSION,
    DeviceStatus,
    DraftMessage,
    GenerationRequest,
    GenerationResponse,
    ResponseStats,
    ServerStatus,
    VerdictMessage,
)
from fleet.protocol.topics import Topics

__all__ = [
    "PROTOCOL_VERSION",
    "DeviceStatus",
    "DraftMessage",
    "GenerationRequest",
    "GenerationResponse",
    "ProtocolError",
    "ResponseStats",
    "ServerStatus",
    "Topics",
    "VerdictMessage",
    "decode_draft",
    "decode_json",
    "decode_verdict",
    "encode",
]
