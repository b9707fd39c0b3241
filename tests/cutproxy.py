"""A loopback TCP proxy in front of the broker that cuts a client's connection at a chosen AMQP
frame: the fault of a broker node dying at the worst moment, made deterministic.

Killing a node (tests/chaos/test_broker_cluster.py) loses the connection at whatever point the
client happens to be in; some points are rare (one run in a dozen). Here the proxy reads the
client's frames (AMQP 0-9-1: a protocol header, then frames of type, channel, size, payload and
an end octet) and, once :meth:`CuttingProxy.cut_at` armed it, closes both sides of the
connection instead of forwarding the matching frame, as a dead node's kernel would.

Only loopback: it listens on 127.0.0.1 and forwards to a loopback broker port.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

#: AMQP 0-9-1 method ids (class, method) as they open a method frame's payload.
CHANNEL_OPEN = (20, 10)
_METHOD_FRAME = 1
_HEADER = struct.Struct(">BHI")
_PROTOCOL_HEADER_BYTES = 8


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class CuttingProxy:
    """Forwards every connection made to :attr:`port` to ``127.0.0.1:upstream_port``; after
    :meth:`cut_at`, the first connection to send the named method frame is cut there."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._armed: tuple[int, int] | None = None
        #: set when an armed cut happened
        self.cut = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, name="cutproxy-accept", daemon=True).start()

    def cut_at(self, method: tuple[int, int]) -> None:
        """Cut the next connection that sends ``method`` (class id, method id) as it sends it."""
        with self._lock:
            self._armed = method
            self.cut.clear()

    def close(self) -> None:
        """Stop listening and close every proxied connection."""
        with self._lock:
            self._closed = True
            pairs, self._pairs = self._pairs, []
        self._listener.close()
        for pair in pairs:
            pair.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            pair = _Pair(client, upstream)
            with self._lock:
                if self._closed:
                    pair.close()
                    return
                self._pairs.append(pair)
            threading.Thread(target=self._client_to_broker, args=(pair,), daemon=True).start()
            threading.Thread(target=self._broker_to_client, args=(pair,), daemon=True).start()

    def _broker_to_client(self, pair: _Pair) -> None:
        with contextlib.suppress(OSError):
            while data := pair.upstream.recv(65536):
                pair.client.sendall(data)
        pair.close()

    def _client_to_broker(self, pair: _Pair) -> None:
        buffer = b""
        header_left = _PROTOCOL_HEADER_BYTES
        with contextlib.suppress(OSError):
            while data := pair.client.recv(65536):
                buffer += data
                if header_left:
                    sent = buffer[:header_left]
                    pair.upstream.sendall(sent)
                    header_left -= len(sent)
                    buffer = buffer[len(sent) :]
                for frame in _frames(buffer):
                    if self._should_cut(frame):
                        self.cut.set()
                        pair.close()
                        return
                    pair.upstream.sendall(frame)
                    buffer = buffer[len(frame) :]
        pair.close()

    def _should_cut(self, frame: bytes) -> bool:
        kind, _channel, _size = _HEADER.unpack_from(frame)
        if kind != _METHOD_FRAME:
            return False
        method = struct.unpack_from(">HH", frame, _HEADER.size)
        with self._lock:
            if self._armed != method:
                return False
            self._armed = None
            return True


def _frames(buffer: bytes) -> Iterator[bytes]:
    """The complete frames at the start of ``buffer`` (a partial one waits for more bytes)."""
    offset = 0
    while len(buffer) - offset >= _HEADER.size:
        _kind, _channel, size = _HEADER.unpack_from(buffer, offset)
        end = offset + _HEADER.size + size + 1
        if end > len(buffer):
            return
        yield buffer[offset:end]
        offset = end


@contextlib.contextmanager
def cutting_proxy(upstream_port: int = 5672) -> Iterator[CuttingProxy]:
    """A :class:`CuttingProxy` in front of the loopback broker, closed on the way out."""
    proxy = CuttingProxy(upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()
