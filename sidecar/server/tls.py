"""TLS on the listeners (SPEC §12): the server context, and its reload when the certificate files change.

TLS 1.2 and 1.3 only (RFC 8996 deprecates 1.0 and 1.1), forward-secret AEAD suites only for 1.2 (1.3's are all
AEAD), no compression, no renegotiation. With a client CA the listener asks for a client certificate without
requiring one (routes require it: `require: {client_cert: ...}`); a certificate that does not verify fails the
handshake.

Reload without dropping connections: the context the server was started with stays the listening one, and its
SNI callback (run for every handshake, with or without a server name) moves the new connection onto the newest
context. Connections already open keep the one they were made with; new handshakes use the new pair. A watcher
looks at the files' modification times every second; a pair that does not load (half written) is ignored until it
does, and the previous one stays in use."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.file_stamps import Stamp, file_stamps

if TYPE_CHECKING:
    from sidecar.config.model import ListenConfig

log = logging.getLogger("sidecar")

CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """The files of one listener's TLS (plain paths: passed to worker processes)."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def choose(cls, listen: ListenConfig, cert: str | None, key: str | None,
               client_ca: str | None) -> ListenerTls | None:
        """The command line's files over the configuration's `listen:` block, each on its own."""
        cert, key = cert or listen.tls_cert, key or listen.tls_key
        client_ca = client_ca or listen.tls_client_ca
        if not cert and not key and not client_ca:
            return None
        if not cert or not key:
            raise ValueError("TLS on the listener needs both --tls-cert and --tls-key (or listen.tls_cert/tls_key)")
        return cls(cert, key, client_ca)

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert, self.key, self.client_ca) if f)


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS_TLS12)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        context.load_verify_locations(tls.client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def check_files(tls: ListenerTls) -> str | None:
    """What is wrong with the files, in one line, or None: for `sidecar run` to refuse to start."""
    try:
        server_context(tls)
    except FileNotFoundError as exc:
        return f"TLS file {exc.filename} does not exist"
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"the TLS files {', '.join(tls.files())} do not load as a PEM certificate, key and CA ({exc})"
    return None


class ReloadingServerContext:
    """The listening context (`front`), which hands each new handshake the newest context built from the files."""

    def __init__(self, tls: ListenerTls) -> None:
        self.tls = tls
        self._stamps = self._file_stamps()
        self.front = server_context(tls)
        self.current = self.front
        self.front.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if self.current is not self.front:
            ssl_object.context = self.current

    def _file_stamps(self) -> tuple[Stamp, ...]:
        return file_stamps(self.tls.files())

    def check(self) -> bool:
        """Rebuild the context if a file changed; whether it did."""
        stamps = self._file_stamps()
        if stamps == self._stamps:
            return False
        try:
            self.current = server_context(self.tls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("listener TLS: the changed files %s do not load (%s); still serving the previous ones",
                        ", ".join(self.tls.files()), exc)
            return False
        self._stamps = stamps
        log.warning("listener TLS: reloaded %s; new connections use it", ", ".join(self.tls.files()))
        return True


async def watch(contexts: Sequence[ReloadingServerContext], every: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every)
        for context in contexts:
            context.check()
