"""Topic names. The device id sits in every board topic so that the broker's ACL
(`pattern write R/devices/%u/...`) can stop one board from touching another's sessions."""

import re
from dataclasses import dataclass

# Ids become topic levels: no wildcards, separators or `$`; short enough for any broker.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # fullmatch: "$" alone lets "\n" end it
SHARE_GROUP = "verifiers"


def check_id(kind: str, value: str) -> str:
    """Refuse an id that would change the topic tree (`+`, `#`, `/`) or break the ACL."""
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{kind} id {value!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic of the protocol under one root (default `sled/v1`)."""

    root: str = "sled/v1"

    def device_status(self, device: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/status"

    def server_status(self, server: str) -> str:
        return f"{self.root}/servers/{check_id('server', server)}/status"

    def open(self, device: str, session: str) -> str:
        return f"{self._session(device, session)}/open"

    def draft(self, device: str, session: str) -> str:
        return f"{self._session(device, session)}/draft"

    def verdict(self, device: str, session: str) -> str:
        return f"{self._session(device, session)}/verdict"

    def requests(self, device: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/requests"

    def response(self, device: str, request: str) -> str:
        return f"{self.responses_prefix(device)}{check_id('request', request)}"

    def responses_prefix(self, device: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/responses/"

    # Subscriptions (wildcards).
    def all_opens_shared(self, group: str = SHARE_GROUP) -> str:
        """Servers claim new sessions through one shared subscription: exactly one gets each.
        Servers pass their secret group name (ServerSettings.share_group; see
        docs/security.md): any client that knows the name can join the group."""
        return f"$share/{check_id('share group', group)}/{self.root}/devices/+/sessions/+/open"

    def all_device_status(self) -> str:
        return f"{self.root}/devices/+/status"

    def all_server_status(self) -> str:
        return f"{self.root}/servers/+/status"

    def device_verdicts(self, device: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/sessions/+/verdict"

    def parse_session_topic(self, topic: str) -> tuple[str, str, str]:
        """(device, session, kind) of a session topic; ValueError for anything else."""
        prefix = f"{self.root}/devices/"
        parts = topic[len(prefix):].split("/") if topic.startswith(prefix) else []
        if len(parts) != 4 or parts[1] != "sessions" or parts[3] not in ("open", "draft", "verdict"):
            raise ValueError(f"not a session topic: {topic!r}")
        return check_id("device", parts[0]), check_id("session", parts[2]), parts[3]

    def _session(self, device: str, session: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/sessions/{check_id('session', session)}"
