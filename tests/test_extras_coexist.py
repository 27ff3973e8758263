"""The optional extras installed together (the `test` extra pulls all of them) do not break one another: the otel
extra's OTLP exporter and proto modules and the grpc extra's Envoy API messages import and work in one process.
(xds-protos, once the grpc extra's Envoy API, shipped its own top-level `opentelemetry/proto` copy that overwrote
opentelemetry-proto's files and silently turned tracing off.)"""

from __future__ import annotations

from importlib.metadata import distributions

from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption, HeaderValueOptionHeaderAppendAction
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextRequest,
    CheckRequest,
    CheckResponse,
    OkHttpResponse,
)
from envoy_data_plane.google.rpc import Status
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def test_otel_exporter_encodes_spans_beside_envoy_messages() -> None:
    """With the Envoy messages imported, the OTLP exporter still encodes a span with its instrumentation scope."""
    assert InstrumentationScope(name="sidecar", version="1").SerializeToString()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with provider.get_tracer("sidecar", "1.2.3").start_as_current_span("check"):
        pass
    request = ExportTraceServiceRequest.FromString(encode_spans(spans.get_finished_spans()).SerializeToString())
    scoped = request.resource_spans[0].scope_spans[0]
    assert (scoped.scope.name, scoped.scope.version, scoped.spans[0].name) == ("sidecar", "1.2.3", "check")


def test_envoy_check_messages_round_trip_beside_otel() -> None:
    """With the otel proto modules imported, a CheckRequest and a CheckResponse survive protobuf wire format."""
    request = CheckRequest(attributes=AttributeContext(request=AttributeContextRequest(http=AttributeContextHttpRequest(
        method="POST", path="/api/x?a=1", headers={":authority": "app.example", "x-request-id": "r1"},
        raw_body=b"\x00body\xff"))))
    assert CheckRequest.parse(bytes(request)) == request
    response = CheckResponse(status=Status(code=0), ok_response=OkHttpResponse(
        headers=[HeaderValueOption(header=HeaderValue(key="X-Auth-Subject", value="alice"),
                                   append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD)],
        headers_to_remove=["authorization"], query_parameters_to_remove=["access_token"]))
    assert CheckResponse.parse(bytes(response)) == response


def test_no_other_distribution_ships_opentelemetry_proto() -> None:
    """Only opentelemetry-proto installs files under opentelemetry/proto (an old copy from another package, as
    xds-protos had, overwrites them)."""
    intruders = sorted({dist.metadata["Name"] for dist in distributions()
                        for file in dist.files or () if str(file).startswith("opentelemetry/proto/")
                        and dist.metadata["Name"].lower().replace("_", "-") != "opentelemetry-proto"})
    assert intruders == []
