"""TLS to https upstreams, for every transport: the client context of one `upstream_tls` setting, rebuilt when
its files change, and the refusal a failed handshake becomes.

cert-manager (and most secret stores) rotate a certificate by rewriting its files in place. A transport asks for
the context each time it opens a connection; at most once a second that looks at the files' modification times
and, when one changed, builds a new context. Connections already open keep the session they have (TLS session
reuse is keep-alive's). A half-written pair (the certificate rewritten, its key not yet) does not load: the old
context stays in use and the files are looked at again a second later."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sidecar.config.model import upstream_tls_context
from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.file_stamps import Stamp, file_stamps

if TYPE_CHECKING:
    from sidecar.config.model import UpstreamTlsConfig

log = logging.getLogger("sidecar")

TLS_FAILED = "upstream_tls_failed"
CHECK_EVERY = 1.0  # seconds between looks at the files' modification times


class UpstreamTlsContext:
    __slots__ = ("_checked", "_context", "_stamps", "server_name", "settings")

    def __init__(self, settings: UpstreamTlsConfig | None, host: str) -> None:
        self.settings = settings
        self.server_name = (settings.server_name if settings else None) or host  # SNI and the name verified
        self._stamps = self._file_stamps()
        self._context = upstream_tls_context(settings)
        self._checked = time.monotonic()

    def _file_stamps(self) -> tuple[Stamp, ...]:
        return file_stamps(self.settings.files() if self.settings else ())

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: the current files' (looked at no more than once a second)."""
        now = time.monotonic()
        if self.settings is not None and now - self._checked >= CHECK_EVERY:
            self._checked = now
            stamps = self._file_stamps()
            if stamps != self._stamps:
                try:
                    self._context = upstream_tls_context(self.settings)
                    self._stamps = stamps
                except (OSError, ssl.SSLError, ValueError) as exc:
                    log.warning("upstream_tls: the changed files %s do not load (%s); still using the previous ones",
                                ", ".join(self.settings.files()), exc)
        return self._context


def tls_refusal(exc: BaseException) -> UpstreamUnavailable:
    """The 502 for a TLS failure with the upstream: which one, in the audit line (`detail`), never to the caller."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamUnavailable("the upstream's TLS certificate could not be verified", reason=TLS_FAILED,
                                   detail=f"upstream TLS certificate verification failed: {exc.verify_message}")
    reason = getattr(exc, "reason", None) or str(exc)
    return UpstreamUnavailable("the TLS handshake with the upstream failed", reason=TLS_FAILED,
                               detail=f"upstream TLS handshake failed: {reason}")


def ssl_error_in(exc: BaseException | None) -> ssl.SSLError | None:
    """The `ssl.SSLError` behind an exception (httpx wraps it), if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def open_connection(protocol: Callable[[], P], host: str, port: int, tls: UpstreamTlsContext | None,
                          timeout: float) -> P:
    """A connection to the upstream, plain or TLS — SNI and certificate verification always (the context checks
    the name: check_hostname) — for the pool and for WebSocket tunnels alike. Failures map onto the error tree:
    504 for time, 502 `upstream_tls_failed` for TLS (audited with why), 502 otherwise."""
    loop = asyncio.get_running_loop()
    try:
        if tls is None:
            connecting = loop.create_connection(protocol, host, port)
        else:
            connecting = loop.create_connection(protocol, host, port, ssl=tls.context(),
                                                server_hostname=tls.server_name, ssl_handshake_timeout=timeout)
        _, connection = await asyncio.wait_for(connecting, timeout)
    except TimeoutError:
        raise UpstreamTimeout("the upstream did not accept a connection in time") from None
    except ssl.SSLError as exc:  # before OSError: it is one
        raise tls_refusal(exc) from None
    except OSError:
        raise UpstreamUnavailable("the upstream could not be reached") from None
    return connection
