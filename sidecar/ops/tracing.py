"""OpenTelemetry tracing, optional (`pip install 'sidecar[otel]'`).

Off — the extra missing, or neither an OTLP endpoint in the environment nor `tracing: {enabled: true}` — the
module-level functions below are no-ops returning None, and nothing of OpenTelemetry is imported: a request
pays one call that returns None. On, `configure` swaps in `sidecar.ops.otel` (the only module importing
OpenTelemetry). Configuration is the standard `OTEL_*` variables (endpoint, protocol, service name, sampler and
ratio), which win over the `tracing:` block of the YAML.

Never recorded on a span: a credential, a query string, a header value."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sidecar.ops.otel import TracingSettings as TracingConfig

log = logging.getLogger("sidecar.tracing")


class RequestTrace(Protocol):
    """The server span of one request."""

    trace_id: str

    def end(self, audit: dict[str, Any]) -> None: ...


class UpstreamTrace(Protocol):
    def end(self, status: int | None) -> None: ...


def _no_request(scope: dict[str, Any]) -> RequestTrace | None:
    return None


def _no_upstream(headers: list[tuple[bytes, bytes]]) -> UpstreamTrace | None:
    return None


_NULL: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def _no_span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
    return _NULL


# The hooks the request path calls. Replaced by `configure` when tracing is on.
start_request = _no_request  # at the start of the gateway: the server span (incoming traceparent continued)
start_upstream = _no_upstream  # around the upstream send: a client span; injects traceparent into `headers`
span = _no_span  # `with tracing.span("jwks.fetch", url=...)`: a child span of the current request, if any
root_span = _no_span  # `with tracing.root_span("webhook.delivery", ...)`: work of its own (a webhook delivery)
_shutdown: list[Any] = []


def wanted(config: TracingConfig | None) -> bool:
    """Tracing is on when the YAML says so or an OTLP endpoint is in the environment, unless OTEL_SDK_DISABLED
    or OTEL_TRACES_EXPORTER=none says otherwise."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return False
    if config is not None and config.enabled is not None:
        return config.enabled
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(config: TracingConfig | None) -> bool:
    """Turn tracing on if wanted and the extra is installed; True when it is on."""
    global start_request, start_upstream, span, root_span
    if not wanted(config):
        return False
    try:
        from sidecar.ops import otel
    except ImportError as exc:
        log.warning("tracing is configured but OpenTelemetry is not installed (pip install 'sidecar[otel]'): "
                    "serving without traces", extra={"missing": exc.name})
        return False
    tracer = otel.OtelTracer(config)
    start_request, start_upstream, span = tracer.start_request, tracer.start_upstream, tracer.span
    root_span = tracer.root_span
    _shutdown.append(tracer.shutdown)
    log.info("tracing on", extra=tracer.describe())
    return True


def shutdown() -> None:
    """Export what is left and turn tracing off again."""
    global start_request, start_upstream, span, root_span
    start_request, start_upstream, span, root_span = _no_request, _no_upstream, _no_span, _no_span
    while _shutdown:
        _shutdown.pop()()
