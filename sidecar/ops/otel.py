"""The OpenTelemetry side of `sidecar.ops.tracing` — imported only when tracing is on.

One SERVER span per request, named `{method} {route id}`, continuing an incoming W3C `traceparent`; a CLIENT
span for the upstream request whose context is injected as `traceparent` so the backend's spans join the trace;
child spans (`tracing.span`) for JWKS fetches, remote validation calls, Redis round trips and webhook
deliveries. The current request's span is found through a context variable (each ASGI request runs in its own
task, so the variable is per request)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
from collections.abc import Iterator
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar import __version__


class TracingSettings(Protocol):
    """The `tracing:` block (config.model.TracingConfig), as this module reads it."""

    @property
    def enabled(self) -> bool | None: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def service_name(self) -> str: ...
    @property
    def sample_ratio(self) -> float: ...


TracingConfig = TracingSettings

_current: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar("sidecar_span", default=None)
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")
# audit field -> span attribute (the audit line never holds a credential, and neither does the span)
_ATTRIBUTES = (("route", "http.route"), ("path", "url.path"), ("status", "http.response.status_code"),
               ("decision", "sidecar.decision"), ("reason", "sidecar.reason"),
               ("authenticator", "sidecar.authenticator"), ("client", "sidecar.client"),
               ("cache", "sidecar.cache"), ("client_ip", "client.address"))


class _Request:
    __slots__ = ("span", "token", "trace_id")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.trace_id = format(span.get_span_context().trace_id, "032x")
        self.token = _current.set(span)

    def end(self, audit: dict[str, Any]) -> None:
        span = self.span
        for field, attribute in _ATTRIBUTES:
            value = audit.get(field)
            if value is not None:
                span.set_attribute(attribute, value)
        if audit.get("route"):
            span.update_name(f"{audit['method']} {audit['route']}")
        status = audit.get("status")
        if isinstance(status, int) and status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        with contextlib.suppress(ValueError):  # ended in another context (a cancelled task): nothing to reset
            _current.reset(self.token)


class _Upstream:
    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def end(self, status: int | None) -> None:
        if status is not None:
            self.span.set_attribute("http.response.status_code", status)
            if status >= 500:
                self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


def _ratio_from_environment(configured: float) -> float | None:
    """The sampling ratio this module decides itself, or None when OTEL_TRACES_SAMPLER names a sampler it leaves to
    the SDK. The standard names are honoured (the OpenTelemetry SDK environment variables)."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return configured
    if name in ("always_on", "parentbased_always_on"):
        return 1.0
    if name in ("always_off", "parentbased_always_off"):
        return 0.0
    if name in ("traceidratio", "parentbased_traceidratio"):
        try:
            return min(1.0, max(0.0, float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
        except ValueError:
            return 1.0
    return None


def _sampled(traceparent: str | None, ratio: float) -> bool:
    """A parent's sampled flag decides (W3C Trace Context: the last field's low bit); without a parent, the ratio."""
    if traceparent is not None:
        flags = traceparent.strip().rpartition("-")[2]
        with contextlib.suppress(ValueError):
            return bool(int(flags, 16) & 1)
    return ratio >= 1.0 or random.random() < ratio


class OtelTracer:
    def __init__(self, config: TracingConfig | None) -> None:
        service = os.environ.get("OTEL_SERVICE_NAME") or (config.service_name if config else None) or "sidecar"
        ratio = config.sample_ratio if config is not None else 1.0
        # Head sampling decided here, before any OpenTelemetry object is made: a request not sampled costs one
        # header scan and one random number (at ratio 0.01 the SDK's own non-recording spans and propagation cost
        # ~50 µs a request here). Spans that are made are then always recorded (ParentBased(ALWAYS_ON)). A
        # sampler named in OTEL_TRACES_SAMPLER that this does not know is left to the SDK, request by request.
        self.ratio = _ratio_from_environment(ratio)
        sampler: Sampler | None
        if self.ratio is not None:
            sampler = ParentBased(ALWAYS_ON)
        else:
            sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(ratio))
        self.provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                                 "service.version": __version__}),
                                       sampler=sampler)
        endpoint = None
        if config is not None and config.endpoint and not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                                           or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            endpoint = config.endpoint.rstrip("/") + "/v1/traces"
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("sidecar", __version__)
        self.service = service

    def describe(self) -> dict[str, Any]:
        return {"service": self.service, "sampler": str(self.provider.sampler.get_description())}

    def start_request(self, scope: dict[str, Any]) -> _Request | None:
        carrier = {}
        for key, value in scope["headers"]:
            if key in _TRACE_HEADERS:
                carrier[key.decode()] = value.decode("latin-1")
        if self.ratio is not None and not _sampled(carrier.get("traceparent"), self.ratio):
            return None  # not sampled: no span, nothing propagated (a client's traceparent passes as it came)
        context = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(scope["method"], context=context, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": scope["method"]})
        return _Request(span)

    def start_upstream(self, headers: list[tuple[bytes, bytes]]) -> _Upstream | None:
        parent = _current.get()
        if parent is None:
            return None
        span = self.tracer.start_span("upstream", context=trace.set_span_in_context(parent), kind=SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        headers[:] = [header for header in headers if header[0] not in _TRACE_HEADERS]
        headers.extend((key.encode(), value.encode()) for key, value in carrier.items())
        return _Upstream(span)

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        parent = _current.get()
        if parent is None:
            yield
            return
        with self.tracer.start_as_current_span(name, context=trace.set_span_in_context(parent),
                                               kind=SpanKind.CLIENT, attributes=attributes) as child:
            token = _current.set(child)
            try:
                yield
            finally:
                _current.reset(token)

    @contextlib.contextmanager
    def root_span(self, name: str, **attributes: Any) -> Iterator[None]:
        """A span that starts a trace of its own (background work: a webhook delivery), head-sampled as requests
        are; its children (`span`) hang under it."""
        if self.ratio is not None and not _sampled(None, self.ratio):
            yield
            return
        with self.tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as root:
            token = _current.set(root)
            try:
                yield
            finally:
                _current.reset(token)

    def shutdown(self) -> None:
        self.provider.shutdown()
