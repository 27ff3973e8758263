"""The configuration: load YAML, substitute `${VAR}`, validate once into frozen typed objects.

Every problem is reported at once as `FILE:LINE: place: message` with the fix; nothing is validated on the
request path. `warnings` are for `sidecar check`: legal but probably not what was meant.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sidecar.authn.remote_check import RemoteCheck
from sidecar.config.clients import ClientConfig
from sidecar.config.limits import BreakerConfig, LimitsConfig, RateLimitConfig, SpoolConfig
from sidecar.config.types import Duration, Model, Network, load_private_key
from sidecar.outbound.guard import url_refusal
from sidecar.state.redis_target import parse_redis_url

DEFAULT_CONFIG = "sidecar.yaml"


class CacheConfig(Model):
    ttl: Duration = 300.0
    negative_ttl: Duration = 10.0
    max_entries: int = Field(default=100_000, ge=1)
    # The local verdict cache's memory budget per worker, in bytes (README "Limits and overload"; the Helm chart's
    # memory limit is derived from it).
    max_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    stale_if_error: Duration = 0.0


class IdentityConfig(Model):
    header_prefix: str = "X-Auth-"
    signed_token: bool = False


class AdminConfig(Model):
    token: str | None = None


class KeysConfig(Model):
    secret: str | list[str] | None = None

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: str | list[str] | None) -> str | list[str] | None:
        for secret in [value] if isinstance(value, str) else value or []:
            if secret and len(secret.encode()) < 32:  # empty (e.g. ${SIDECAR_KEYS_SECRET:-}) means not set
                raise ValueError("keys.secret must be at least 32 bytes; generate one with `openssl rand -base64 48`")
        return value

    def secrets(self) -> list[str]:
        if self.secret is None or self.secret == "":
            return []
        return [self.secret] if isinstance(self.secret, str) else list(self.secret)


class TimeoutsConfig(Model):
    connect: Duration = 5.0
    read: Duration = 60.0


class UpstreamTlsConfig(Model):
    """TLS to an https upstream (SPEC §12): a private CA, a client certificate, the name to verify. Verification
    and SNI are always on: there is no switch to skip them (a private CA is the answer to a self-signed upstream).
    The files are read at load and again whenever they change (cert-manager rotates them in place)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _loads(self) -> UpstreamTlsConfig:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        for path in self.files():
            if not os.path.isfile(path):
                raise ValueError(f"{path} does not exist (or is not a file)")
        try:
            upstream_tls_context(self)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ValueError(f"the files do not load as PEM certificates and key ({exc})") from None
        return self

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f)


def upstream_tls_context(tls: UpstreamTlsConfig | None) -> ssl.SSLContext:
    """A client context for an https upstream: the system's CAs, or only `ca_file`'s when given; hostname checked."""
    context = ssl.create_default_context(cafile=tls.ca_file if tls else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls and tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if tls and tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


class ListenConfig(Model):
    """TLS on the main listener (`sidecar run --tls-cert/--tls-key/--tls-client-ca` override these)."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> ListenConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give tls_cert and tls_key together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (client certificates are asked for over TLS)")
        return self


class MatchConfig(Model):
    methods: list[str] | None = None
    path: str | None = None
    path_regex: str | None = None
    host: str | None = None

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str] | None) -> list[str] | None:
        return [m.upper() for m in value] if value else None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"path {value!r} must start with /")
        return value

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"path_regex does not compile: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_path(self) -> MatchConfig:
        if (self.path is None) == (self.path_regex is None):
            raise ValueError("give exactly one of path (a glob such as /api/**) or path_regex")
        return self


class ClientCertRequire(Model):
    """A verified client certificate on the TLS listener; when lists are given, its subject (RFC 4514, as
    `CN=partner,O=Example`) or its SHA-256 fingerprint (hex, colons allowed) must be listed."""

    subjects: list[str] = []
    fingerprints: list[str] = []

    @field_validator("fingerprints")
    @classmethod
    def _hex(cls, value: list[str]) -> list[str]:
        out = []
        for fingerprint in value:
            normal = fingerprint.replace(":", "").strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", normal):
                raise ValueError(f"{fingerprint!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed); "
                                 "get one with `openssl x509 -in cert.pem -noout -fingerprint -sha256`")
            out.append(normal)
        return out


class RequireConfig(Model):
    scopes: list[str] = []
    clients: list[str] = []
    ips: list[Network] = []
    client_cert: ClientCertRequire | None = None


class EmitConfig(Model):
    event: str
    when: Literal["2xx", "3xx", "4xx", "5xx", "any"] = "2xx"
    max_body: int = Field(default=256 * 1024, ge=0)  # larger replies are not captured (the event says so)


# An origin as browsers send it (RFC 6454 §6.2): scheme://host[:port], nothing after. A pattern may start its host
# with one `*.` label: `https://*.example.com` (sidecar/proxy/cors.py says what it matches).
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://(\*\.)?[a-z0-9.-]+(?::[0-9]{1,5})?$")


class CorsConfig(Model):
    """CORS for a route (Fetch standard §3.2): preflights answered by the sidecar, headers on every answer."""

    allow_origins: list[str] = Field(min_length=1)
    allow_methods: list[str] | None = None  # default: the route's match.methods, else GET, HEAD, POST
    allow_headers: list[str] = ["Authorization", "Content-Type"]
    expose_headers: list[str] = []
    allow_credentials: bool = False
    max_age: Duration = 600.0

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = [origin.lower().rstrip("/") for origin in value]
        for origin in out:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin; write scheme://host[:port] such as "
                                 "https://portal.example or https://*.example.com (no path)")
        if "*" in out and len(out) > 1:
            raise ValueError('"*" allows every origin: give it alone, or list the origins instead')
        return out

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        return [m.upper() for m in value] if value else None

    @model_validator(mode="after")
    def _credentials(self) -> CorsConfig:
        if self.allow_credentials and self.allow_origins == ["*"]:
            # Fetch §3.2.5: a credentialed answer must name the origin; "*" with credentials would let any site
            # read authenticated replies. Listing origins is the fix.
            raise ValueError('allow_origins: ["*"] cannot be combined with allow_credentials: true (any web site '
                             "could read replies made with the user's credentials); list the origins instead, "
                             "such as [https://portal.example]")
        return self


class WebSocketConfig(Model):
    """WebSocket tunnels through a route: closed after `idle_timeout` without a byte either way, and after
    `max_lifetime` in any case (unbounded when not given)."""

    idle_timeout: Duration = 3600.0
    max_lifetime: Duration | None = None


class WebSocketLimits(WebSocketConfig):
    """The top-level `websocket:` block: the routes' defaults, and the most tunnels one worker process holds open
    (503 above it)."""

    max_tunnels: int = Field(default=10_000, ge=1)


class RouteConfig(Model):
    id: str
    match: MatchConfig
    auth: list[str] = Field(min_length=1)
    require: RequireConfig = RequireConfig()
    upstream: str | None = None
    upstream_tls: UpstreamTlsConfig | None = None
    emit: list[EmitConfig] = []
    login_url: str | None = None
    max_body: int = Field(default=1024 * 1024, ge=0)
    audit: bool = True  # false: no audit line for this route (health probes); metrics still count it
    # report_only: refusals (401/403) are audited as `would_deny` and the request is forwarded anyway (SPEC §13)
    mode: Literal["enforce", "report_only"] = "enforce"
    cors: CorsConfig | None = None
    websocket: WebSocketConfig | bool = True  # false: upgrades refused; true: the top-level `websocket:` settings
    rate_limit: RateLimitConfig | None = None

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        return _check_upstream(value) if value else None


class RetryConfig(Model):
    initial: Duration = 5.0
    max_delay: Duration = 3600.0
    max_attempts: int = Field(default=12, ge=1)


class WebhookConfig(Model):
    id: str
    allow_private: bool = False  # declared before url: the url check reads it
    url: str
    events: list[str] = Field(min_length=1)
    secret: str | list[str] = Field(repr=False)  # never printed, logged or shown
    retry: RetryConfig | None = None
    timeout: Duration = 10.0
    max_concurrent: int = Field(default=4, ge=1)  # attempts in flight to this receiver per process
    breaker: BreakerConfig = BreakerConfig()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        # Only what needs no DNS (literal addresses, localhost); names are checked at delivery (netguard).
        problem = url_refusal(value, bool(info.data.get("allow_private")))
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: str | list[str]) -> str | list[str]:
        secrets = [value] if isinstance(value, str) else value
        if not secrets:
            raise ValueError("give at least one secret (several while rotating)")
        for secret in secrets:
            if not _is_whsec(secret):
                raise ValueError("a webhook secret is whsec_ followed by the base64 of 24 to 64 random bytes; "
                                 "generate one with: python -c \"import base64,os; "
                                 "print('whsec_'+base64.b64encode(os.urandom(32)).decode())\"")
        return value


def _is_whsec(secret: str) -> bool:
    """Standard Webhooks secrets: `whsec_` + base64 of 24 to 64 bytes."""
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except ValueError:
        return False
    return 24 <= len(key) <= 64


class IssuerConfig(Model):
    issuer: str = "https://sidecar.local"
    signing_key: str | list[str] | None = None
    access_token_ttl: Duration = 120.0
    audience: str | None = None
    prefix: str = "/_sidecar"
    credentials: RemoteCheck | None = None  # the webservice that checks the password grant (json_status)

    @field_validator("access_token_ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("access_token_ttl must be between 1s and 24h; short-lived tokens need no revocation")
        return value

    @field_validator("credentials", mode="before")
    @classmethod
    def _credentials_defaults(cls, value: Any) -> Any:
        # Username and password go in a POSTed form unless told otherwise, and the answer is json_status (seed 001).
        if isinstance(value, dict):
            return {"method": "POST", "send": "form", "response": "json_status", **value}
        return value

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: RemoteCheck | None) -> RemoteCheck | None:
        if value is not None:
            if value.send == "query" or "{value}" in value.url:
                raise ValueError("credentials would put the password in the URL, which servers and proxies log; "
                                 "use send: form, json or header, and no {value} in url")
            if value.response == "introspection":
                raise ValueError("credentials checks a username and password: use response json_status or boolean")
        return value

    @field_validator("signing_key")
    @classmethod
    def _keys(cls, value: str | list[str] | None) -> str | list[str] | None:
        for pem in [value] if isinstance(value, str) else value or []:
            if pem:
                load_private_key(pem)
        return value or None

    def signing_keys(self) -> list[str]:
        if not self.signing_key:
            return []
        return [self.signing_key] if isinstance(self.signing_key, str) else list(self.signing_key)


class TracingConfig(Model):
    """OpenTelemetry tracing (the otel extra). OTEL_* environment variables win over these keys."""

    enabled: bool | None = Field(default=None, description="On or off; unset: on when an OTLP endpoint is set.")
    endpoint: str | None = Field(default=None, description="OTLP/HTTP base URL of a Collector "
                                 "(OTEL_EXPORTER_OTLP_ENDPOINT), e.g. http://otel-collector:4318.")
    service_name: str = Field(default="sidecar", description="service.name (OTEL_SERVICE_NAME).")
    sample_ratio: float = Field(default=1.0, ge=0, le=1, description="Share of new traces sampled; an incoming "
                                "traceparent's sampled flag is followed (OTEL_TRACES_SAMPLER_ARG).")


class Config(Model):
    version: Literal[1]
    upstream: str
    upstream_tls: UpstreamTlsConfig | None = None
    listen: ListenConfig = ListenConfig()
    trusted_proxies: list[Network] = []
    redis: str | None = None
    cache: CacheConfig = CacheConfig()
    identity: IdentityConfig = IdentityConfig()
    admin: AdminConfig = AdminConfig()
    keys: KeysConfig = KeysConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    authenticators: dict[str, Any] = {}
    clients: list[ClientConfig] = []
    routes: list[RouteConfig] = []
    issuer: IssuerConfig | None = None
    webhooks: list[WebhookConfig] = []
    webhook_retry: RetryConfig = RetryConfig()
    tracing: TracingConfig | None = None
    websocket: WebSocketLimits = WebSocketLimits()
    limits: LimitsConfig = LimitsConfig()
    webhook_spool: SpoolConfig = SpoolConfig()

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        return _check_upstream(value)

    @field_validator("redis")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        if not value:
            return None
        parse_redis_url(value).check_files()  # a ValueError says what is wrong, never repeating a password
        return value

    def client(self, client_id: str) -> ClientConfig | None:
        for client in self.clients:
            if client.id == client_id:
                return client
        return None


def _check_upstream(value: str) -> str:
    if not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", value or ""):
        raise ValueError(f"{value!r} is not an upstream URL; write http://host:port (optionally with a base path)")
    return value.rstrip("/")


class LoadedConfig:
    """A validated configuration with its source file and the warnings `sidecar check` prints."""

    def __init__(self, config: Config, path: str, authenticators: dict[str, Any], warnings: list[str]) -> None:
        self.config = config
        self.path = path
        self.authenticators = authenticators  # name -> validated authenticator config model
        self.warnings = warnings
