"""An in-memory asyncio transport for protocol tests: records writes, pause/resume and close."""

from __future__ import annotations

import asyncio


class FakeTransport(asyncio.Transport):
    def __init__(self, peername=("127.0.0.1", 50000)):
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.eof = False
        self.aborted = False
        self.reading = True
        self._protocol = None
        self._extra = {"peername": peername, "sockname": ("127.0.0.1", 9000)}

    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def set_protocol(self, protocol):
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def write(self, data):
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's transports
        if not self.closed:
            self.written += data

    def writelines(self, chunks):
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    @property
    def done(self):
        """Our side is finished: closed, or its end sent (the peer's late bytes are dropped)."""
        return self.closed or self.eof

    def close(self):
        if not self.closed:
            self.closed = True
            protocol = self._protocol
            if protocol is not None:
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def abort(self):
        self.aborted = True
        self.close()

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_reading(self):
        return self.reading

    def get_write_buffer_size(self):
        return 0

    def take(self) -> bytes:
        out = bytes(self.written)
        self.written.clear()
        return out


def attach(protocol) -> FakeTransport:
    """Connect ``protocol`` to a fresh FakeTransport (call inside a running loop)."""
    transport = FakeTransport()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return transport
