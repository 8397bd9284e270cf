"""The report channel over TCP (docs/report-channel.md, "Over TCP"): how a remote trial, or
the Dask task that launches it, reaches the daemon's report listener, optionally over TLS
(standard library only).

- `connect(address, patience, context)`: a connection to ``HOST:PORT``, tried for
  `patience` seconds (backing off from 50 ms to 1 s), then, given an SSL context, its TLS
  handshake (not retried: a certificate that is refused stays refused).
- `TlsFiles`: the CA, certificate and key files of one side; `server_context` makes the
  listener's (``tuned serve --tls-cert/--tls-key [--tls-ca]``), `client_context` a
  worker's or a trial's.
- `NOT_NOW` and `buffered`: what the daemon's non-blocking reads of a channel that may be
  TLS need (`SSLWantReadError` is "not now"; decrypted bytes wait in `pending()`).

The host-name rule: a client verifies the daemon's certificate against its CA file
(``CERT_REQUIRED``) but not the host name in it (``check_hostname`` off). The name the
workers reach the listener by (``--advertise``, often an IP address) need not be in the
certificate, as with Dask's own TLS, which does not check host names either. So the CA must
be the cluster's own: any certificate it signed is trusted as the daemon's.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuned.protocol.channel import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV

#: Seconds one connection attempt (and its TLS handshake) may take.
CONNECT_TIMEOUT = 30.0
#: What a non-blocking read or write raises when it can go on only later ("not now": the
#: TLS ones as BlockingIOError is on a plain socket, not a closed channel).
NOT_NOW = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def buffered(sock: socket.socket) -> int:
    """The bytes `sock` holds decrypted where select() does not see them (a TLS socket's
    `pending()`: read them before waiting on it again); 0 for a plain socket."""
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0


@dataclass(frozen=True)
class TlsFiles:
    """One side's TLS files: `ca` (the CA that signed the other side's certificate), its
    own `cert` and `key` (None: the key is in the certificate file)."""

    ca: str
    cert: str
    key: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """As a JSON object (``{"ca", "cert", "key"}``), for a hello or a fork request."""
        return {"ca": self.ca, "cert": self.cert, "key": self.key}

    @classmethod
    def from_dict(cls, body: Any) -> TlsFiles:
        """The inverse of `to_dict`; ValueError when `body` is not such an object."""
        if not isinstance(body, dict) or not all(
                isinstance(body.get(k), str) and body[k] for k in ("ca", "cert")) or \
                not isinstance(body.get("key"), (str, type(None))):
            raise ValueError(f"bad TLS files {str(body)[:120]!r}")
        return cls(body["ca"], body["cert"], body.get("key") or None)

    def env(self) -> dict[str, str]:
        """The trial's environment naming them (`TLS_CA_ENV` and the others)."""
        env = {TLS_CA_ENV: self.ca, TLS_CERT_ENV: self.cert}
        if self.key:
            env[TLS_KEY_ENV] = self.key
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TlsFiles | None:
        """The files `env()` named in `environ`; None when its CA or certificate is not set."""
        ca, cert = environ.get(TLS_CA_ENV), environ.get(TLS_CERT_ENV)
        if not ca or not cert:
            return None
        return cls(ca, cert, environ.get(TLS_KEY_ENV) or None)


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The report listener's context: its certificate and key; with `ca`, a client must
    present a certificate signed by it (mutual TLS). TLS 1.2 at the least. OSError or
    ssl.SSLError when a file cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: a client that only writes (a log connection) would leave
    # them unread, and a socket closed with unread bytes is reset, not closed: the kernel
    # drops what it had not sent yet (the end of a trial's output).
    context.num_tickets = 0
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A worker's or a trial's context: the daemon's certificate verified against
    `files.ca`, its host name not (the module docstring's rule); `files.cert` and
    `files.key` presented as the client's. OSError or ssl.SSLError when a file cannot be
    loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)
    return context


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def connect(address: str, patience: float,
            context: ssl.SSLContext | None = None) -> socket.socket:
    """A blocking connection to the report listener at `address` (``HOST:PORT``), tried for
    `patience` seconds; with `context`, wrapped in TLS (the handshake done). Its timeout is
    `CONNECT_TIMEOUT`: the caller sets the one it wants. OSError when no connection could
    be made (ssl.SSLError: the handshake failed)."""
    host, port = split_address(address)
    deadline = time.monotonic() + patience
    delay = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
            # Lines go out as they are written: no Nagle wait (up to 40 ms) behind the last.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(1.0, delay * 2)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise

