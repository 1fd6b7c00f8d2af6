"""Proving the API key on a connection (docs/protocol.md, "Authentication").

When ``controller_api_key`` is set, the first frame on a worker's command or P2P connection
must be ``{"t": "auth", "api_key": KEY}``; anything else, or another key, gets an ``error``
frame with code ``unauthorized`` and the connection is closed. The report connection carries
the key in its ``hello`` instead. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from typing import Any

AUTH = "auth"
UNAUTHORIZED = "unauthorized"
# Until the key is proven a peer is a stranger: its first frame may be no larger than this,
# and must arrive within AUTH_TIMEOUT seconds, so strangers cannot make a worker buffer a
# large frame or hold its connections.
MAX_AUTH_FRAME_BYTES = 4096
AUTH_TIMEOUT = 10.0


def auth_frame(api_key: str) -> dict[str, Any]:
    return {"t": AUTH, "api_key": api_key}


def key_matches(given: Any, expected: str) -> bool:
    """Whether ``given`` is the key ``expected``, in time independent of where they differ."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def check_first_frame(message: dict, expected: str) -> bool:
    """Whether ``message``, the first frame of a connection, proves the key."""
    return message.get("t") == AUTH and key_matches(message.get("api_key"), expected)
