"""The lookup controller: raw HTTP/1.1 API plus the workers' monitor port (docs/controller.md)."""

from ..wire.report import PROTOCOL_VERSION
from .settings import Settings

__all__ = ["PROTOCOL_VERSION", "Controller", "Settings"]


def __getattr__(name: str):
    # The server pulls in the native index; import it only when asked for.
    if name == "Controller":
        from .server import Controller

        return Controller
    raise AttributeError(name)
