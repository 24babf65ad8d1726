"""HTTP/2 clients for the tests, over real TLS sockets with ALPN ``h2``.

- ``H2Client``: a well-behaved client on python-hyper's ``h2`` (client side): requests on
  streams, responses collected per stream (status, headers, body, or the reset code).
- ``RawH2``: frames written by hand with ``hyperframe`` and ``hpack``, for the attack tests
  that must send exactly the frames a client should not; it reads the server's frames back
  (``frames_until``), so a test sees the GOAWAY and its error code.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from support.waiting import TIMEOUT

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Header = tuple[bytes, bytes]


def h2_socket(port: int, server_hostname: str, context: ssl.SSLContext,
              alpn: Sequence[str] = ("h2", "http/1.1"), timeout: float = TIMEOUT,
              rcvbuf: int = 0) -> ssl.SSLSocket:
    """A TLS socket to 127.0.0.1:``port`` that offered ``alpn`` (``rcvbuf``: a small
    receive buffer, for a client that reads nothing)."""
    context.set_alpn_protocols(list(alpn))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(timeout)
    raw.connect(("127.0.0.1", port))
    return context.wrap_socket(raw, server_hostname=server_hostname)


@dataclass
class H2Response:
    status: int = 0
    headers: list[Header] = field(default_factory=list)
    body: bytes = b""
    reset: int | None = None  # RST_STREAM's error code, if the stream was reset
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H2Client:
    """One HTTP/2 connection, driven synchronously: ``request`` opens a stream, ``wait``
    reads until the streams asked for have ended."""

    def __init__(self, port: int, server_hostname: str, context: ssl.SSLContext,
                 timeout: float = TIMEOUT) -> None:
        self.sock = h2_socket(port, server_hostname, context, timeout=timeout)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.responses: dict[int, H2Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.authority = server_hostname
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, *, method: str = "GET", authority: str | None = None,
                headers: Iterable[tuple[str, str]] = (), body: bytes | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"https"),
                  (b":authority", (authority or self.authority).encode()),
                  (b":path", path.encode())]
        fields += [(k.lower().encode(), v.encode()) for k, v in headers]
        self.conn.send_headers(sid, fields, end_stream=body is None)
        self.responses[sid] = H2Response()
        if body is not None:
            self._send_body(sid, body)
        self._flush()
        return sid

    def _send_body(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        while True:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self._flush()
                self._read_once()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(sid, chunk.tobytes(), end_stream=not view)
            if not view:
                return

    def _read_once(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise EOFError("the server closed the connection")
        for ev in self.conn.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            response = self.responses.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and response is not None:
                response.headers = list(ev.headers)
                response.status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived) and response is not None:
                response.body += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and response is not None:
                response.ended = True
            elif isinstance(ev, h2.events.StreamReset) and response is not None:
                response.reset = int(ev.error_code)
                response.ended = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        self._flush()

    def wait(self, *sids: int, timeout: float = TIMEOUT) -> list[H2Response]:
        deadline = time.monotonic() + timeout
        while not all(self.responses[s].ended for s in sids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams {sids} did not end")
            try:
                self._read_once()
            except EOFError:
                break
        return [self.responses[s] for s in sids]

    def get(self, path: str, **kw: object) -> H2Response:
        sid = self.request(path, **kw)  # type: ignore[arg-type]
        return self.wait(sid)[0]

    def wait_goaway(self, timeout: float = TIMEOUT) -> h2.events.ConnectionTerminated:
        deadline = time.monotonic() + timeout
        while self.goaway is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no GOAWAY")
            self._read_once()
        return self.goaway

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Frames by hand


class RawH2:
    """A TLS connection with ALPN h2 on which the test writes frames itself."""

    def __init__(self, port: int, server_hostname: str, context: ssl.SSLContext,
                 preface: bool = True, timeout: float = TIMEOUT, rcvbuf: int = 0) -> None:
        self.sock = h2_socket(port, server_hostname, context, alpn=("h2",), timeout=timeout,
                              rcvbuf=rcvbuf)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.encoder = hpack.Encoder()
        self.authority = server_hostname.encode()
        self._buf = b""
        self.frames: list[Frame] = []
        if preface:
            self.send(PREFACE + SettingsFrame(0).serialize())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frames(self, *frames: Frame) -> None:
        self.send(b"".join(f.serialize() for f in frames))

    def block(self, path: str = "/", *, method: str = "GET",
              extra: Sequence[Header] = (), authority: bytes | None = None,
              fields: Sequence[Header] | None = None) -> bytes:
        """An HPACK header block for a request (or exactly ``fields``)."""
        if fields is None:
            fields = [(b":method", method.encode()), (b":scheme", b"https"),
                      (b":authority", authority or self.authority),
                      (b":path", path.encode()), *extra]
        return self.encoder.encode(list(fields))

    def headers(self, sid: int, block: bytes, *, end_stream: bool = True,
                end_headers: bool = True) -> HeadersFrame:
        f = HeadersFrame(sid)
        f.data = block
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        return f

    def read_frame(self, timeout: float = TIMEOUT) -> Frame | None:
        """The next frame from the server; None at EOF (or a reset)."""
        self.sock.settimeout(timeout)
        while True:
            if len(self._buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
                if len(self._buf) >= 9 + length:
                    f.parse_body(memoryview(self._buf[9:9 + length]))
                    self._buf = self._buf[9 + length:]
                    self.frames.append(f)
                    return f
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not data:
                return None
            self._buf += data

    def frames_until(self, stop: Callable[[Frame], bool], timeout: float = TIMEOUT
                     ) -> list[Frame]:
        """Frames read until ``stop`` holds for one (included) or the connection ends."""
        out: list[Frame] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.read_frame(max(0.01, deadline - time.monotonic()))
            if f is None:
                return out
            out.append(f)
            if stop(f):
                return out
        raise TimeoutError(f"no frame ended the wait; got {[type(f).__name__ for f in out]}")

    def goaway(self, timeout: float = TIMEOUT) -> GoAwayFrame:
        """Read until the server's GOAWAY (after which it closes)."""
        frames = self.frames_until(lambda f: isinstance(f, GoAwayFrame), timeout)
        assert frames and isinstance(frames[-1], GoAwayFrame), \
            f"no GOAWAY: {[type(f).__name__ for f in frames]}"
        return frames[-1]

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """Read until EOF; True if the server closed within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                f = self.read_frame(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if f is None:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


__all__ = [
    "PREFACE", "ContinuationFrame", "DataFrame", "GoAwayFrame", "H2Client", "H2Response",
    "HeadersFrame", "PingFrame", "RawH2", "RstStreamFrame", "SettingsFrame",
    "WindowUpdateFrame", "h2_socket",
]
