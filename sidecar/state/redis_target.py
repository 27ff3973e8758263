"""What a `redis:` URL says, and the `redis.asyncio` client it makes. Parsed once, at load: a URL that cannot
work (an unknown scheme or parameter, an unreadable certificate) is a configuration error, not a 503 later.

    redis://[user:password@]host:6379[/db]                          one server
    rediss://...                                                    the same over TLS
    redis+sentinel://[user:password@]host:26379[,host:port]/service[/db]   the master a Sentinel names
    rediss+sentinel://...                                           TLS to the sentinels and to the master
    redis+cluster://[user:password@]host:6379[,host:port]           a Redis Cluster (seed nodes)
    rediss+cluster://...                                            the same over TLS
    unix:///path/to/redis.sock[?db=0]                               a local socket

Query parameters (values percent-encoded): `ssl_ca_certs` (CA file, PEM), `ssl_certfile` and `ssl_keyfile` (a
client certificate), `ssl_check_hostname=false` (verify the chain but not the name: cluster nodes are often
announced by IP), `sentinel_username` and `sentinel_password` (the sentinels' own credentials; the user and
password in the URL are the data nodes'). Certificates are always verified. Messages never repeat a password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

_SCHEMES = {
    "redis": ("standalone", False), "rediss": ("standalone", True),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
    "unix": ("unix", False),
}
_TLS_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_SENTINEL_PARAMETERS = ("sentinel_username", "sentinel_password")
_USAGE = ("redis must be a URL: redis://host:6379/0, rediss://host:6380/0, redis+sentinel://host:26379/mymaster/0, "
          "redis+cluster://host:6379 (rediss+ for TLS) or unix:///path/redis.sock")
TIMEOUTS = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}


@dataclass(frozen=True)
class RedisTarget:
    mode: str  # standalone, sentinel, cluster, unix
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    db: int = 0
    service: str = ""
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True

    def __repr__(self) -> str:  # never the passwords
        return f"RedisTarget(mode={self.mode!r}, tls={self.tls}, hosts={self.hosts!r})"

    def tls_options(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        return {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": self.ca_file, "ssl_certfile": self.cert_file,
                "ssl_keyfile": self.key_file, "ssl_check_hostname": self.check_hostname}

    def check_files(self) -> None:
        """The CA and client certificate load (at start, not at the first connection)."""
        for name, path in (("ssl_ca_certs", self.ca_file), ("ssl_certfile", self.cert_file),
                           ("ssl_keyfile", self.key_file)):
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"redis {name}: cannot read {path}: {exc.strerror}") from None
        context = ssl.create_default_context()
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, ValueError):
                raise ValueError(f"redis ssl_ca_certs: {self.ca_file} holds no PEM certificate") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, ValueError):
                raise ValueError(f"redis ssl_certfile/ssl_keyfile: {self.cert_file} and its key do not load "
                                 "(PEM certificate and matching unencrypted key)") from None


def parse_redis_url(url: str) -> RedisTarget:
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in _SCHEMES:
        raise ValueError(_USAGE)
    mode, tls = _SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("#")[0].partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    params = _parameters(query, mode, tls)
    fields: dict[str, Any] = {
        "mode": mode, "tls": tls, "username": unquote(user) or None, "password": unquote(password) or None,
        "sentinel_username": params.get("sentinel_username"), "sentinel_password": params.get("sentinel_password"),
        "ca_file": params.get("ssl_ca_certs"), "cert_file": params.get("ssl_certfile"),
        "key_file": params.get("ssl_keyfile"),
        "check_hostname": params.get("ssl_check_hostname", "true").lower() not in ("false", "no", "0"),
    }
    segments = [unquote(s) for s in path.split("/") if s]
    if mode == "unix":
        if not path:
            raise ValueError("a unix URL names the socket: unix:///path/to/redis.sock")
        return RedisTarget(**fields, path="/" + unquote(path), db=_db(params.get("db", "0")))
    hosts = _hosts(hostlist, 26379 if mode == "sentinel" else 6379)
    if mode == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError("a redis+sentinel URL names the service: redis+sentinel://host:26379/mymaster/0")
        db = _db(segments[1] if len(segments) > 1 else "0")
        return RedisTarget(**fields, hosts=hosts, service=segments[0], db=db)
    if mode == "cluster":
        if segments not in ([], ["0"]):
            raise ValueError("a Redis Cluster has only database 0: redis+cluster://host:6379")
        return RedisTarget(**fields, hosts=hosts)
    if len(hosts) > 1 or len(segments) > 1:
        raise ValueError("a redis:// URL names one server and a database: redis://host:6379/0 "
                         "(several hosts: redis+sentinel:// or redis+cluster://)")
    return RedisTarget(**fields, hosts=hosts, db=_db(params.get("db", segments[0] if segments else "0")))


def _parameters(query: str, mode: str, tls: bool) -> dict[str, str]:
    known = {"db"} if mode in ("standalone", "unix") else set()
    if tls:
        known.update(_TLS_PARAMETERS)
    if mode == "sentinel":
        known.update(_SENTINEL_PARAMETERS)
    params = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
    for name in params:
        if name not in known:
            if name in _TLS_PARAMETERS:
                raise ValueError(f"redis URL parameter {name!r} needs TLS: rediss://, rediss+sentinel:// or "
                                 "rediss+cluster://")
            takes = ", ".join(sorted(known)) or "none"
            raise ValueError(f"unknown redis URL parameter {name!r}; this URL takes: {takes}")
    return params


def _hosts(hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in hostlist.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host:
            raise ValueError("the redis URL names no host: redis://host:6379/0")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"the redis URL has an invalid port {port!r}")
        hosts.append((unquote(host), int(port or default_port)))
    return tuple(hosts)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the redis database must be a number, not {text!r}")
    return int(text)


def connect(target: RedisTarget | str) -> Any:
    """A `redis.asyncio` client. Nothing is connected yet (a cluster client loads its slot map in `initialize`)."""
    import redis.asyncio as redis

    if isinstance(target, str):
        target = parse_redis_url(target)
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    # redis-py's default retries a refused connection ten times over ~4 s; a request failing closed should
    # learn it in milliseconds. One retry covers a pooled connection the server closed meanwhile.
    retry = Retry(ExponentialBackoff(cap=0.1, base=0.02), 1)
    common: dict[str, Any] = {**TIMEOUTS, "decode_responses": True, "username": target.username,
                              "password": target.password, "retry": retry, **target.tls_options()}
    if target.mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel_options = {**TIMEOUTS, "username": target.sentinel_username, "password": target.sentinel_password,
                            "retry": retry, **target.tls_options()}
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_options)
        return sentinel.master_for(target.service, db=target.db, **common)
    if target.mode == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        # Two retries: a moved slot or a failed-over master needs one to reload the slot map and one to land.
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
                            **{**common, "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 2)})
    if target.mode == "unix":
        return redis.Redis(unix_socket_path=target.path, db=target.db, health_check_interval=15, **common)
    (host, port), = target.hosts
    return redis.Redis(host=host, port=port, db=target.db, health_check_interval=15, **common)


def describe_failure(exc: BaseException) -> str:
    """A short, secret-free account of why Redis cannot be used: what an operator reads in /readyz and the log."""
    from redis import exceptions as rx

    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for each in chain:
        if isinstance(each, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(each):
            detail = getattr(each, "verify_message", None) or "certificate verify failed"
            return f"TLS certificate verification failed ({detail}): check ssl_ca_certs and the server's certificate"
    for each in chain:
        if isinstance(each, ssl.SSLError):
            return f"TLS handshake failed ({each.reason or type(each).__name__})"
    for each in chain:
        if isinstance(each, rx.AuthenticationError) or any(w in str(each) for w in ("WRONGPASS", "NOAUTH")):
            return "authentication failed: check the user name and password"
        if isinstance(each, rx.ClusterDownError) or "CLUSTERDOWN" in str(each):
            return "the cluster is down (CLUSTERDOWN): a hash slot has no reachable master"
        if isinstance(each, (TimeoutError, rx.TimeoutError)):
            return "timed out"
        if isinstance(each, ConnectionRefusedError) or "Connection refused" in str(each):
            return "connection refused"
    text = str(exc).split("\n", 1)[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
