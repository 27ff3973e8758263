"""Redis Cluster, and Redis over TLS, as deployments the tests start from `redis-server` (issue 20): a fresh sidecar
accepts client tokens at once; a revocation is all-or-nothing and always announced, also when a master dies; TLS
with passwords and client certificates works to a cluster, through Sentinel and to one server, and a wrong CA says
so; /readyz stays 200 through Redis trouble and its body and the metrics say what is true. The measurements the
README quotes are printed with `-s` (lines starting `[measure]`)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_support import Cluster, Sentinel, Tls, make_tls, start_sentinel

from sidecar.config.loader import load
from sidecar.config.yaml_lines import ConfigError
from sidecar.state.client_token_store import new_token, token_hash
from sidecar.state.redis_target import parse_redis_url
from sidecar.testing import SidecarProcess, serve_in_thread

ADMIN = "cluster-admin-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
CLIENT = "01400-2"
CLIENT_KEYS = f"sidecar:{{client:{CLIENT}}}:tokens"  # the slot of every key of this client's tokens
TOKEN = new_token()
PASSWORD = "cluster pass/word"  # needs percent-encoding in a URL


async def paid(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"paid": true}'})


@pytest.fixture(scope="session")
def upstream() -> Iterator[str]:
    with serve_in_thread(paid) as url:
        yield url


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three masters, no replicas, plain TCP."""
    servers = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Cluster]:
    """Three masters speaking only TLS (client certificates required, the cluster bus too), with a password."""
    servers = Cluster(tmp_path_factory.mktemp("tls-cluster"), tls=tls, password=PASSWORD)
    try:
        yield servers
    finally:
        servers.stop()


def write_config(path: Path, upstream: str, redis: str) -> Path:
    """Client tokens only: nothing else (a webhook queue, say) touches Redis at start-up."""
    path.write_text(json.dumps({
        "version": 1, "upstream": upstream, "redis": redis, "admin": {"token": ADMIN},
        "authenticators": {"licence": {"type": "client_token"}},
        "clients": [{"id": CLIENT, "tokens": [f"sha256:{token_hash(TOKEN)}"]}],
        "routes": [{"id": "pay", "match": {"path": "/pay/**"}, "auth": ["licence"]}],
    }))
    return path


def pay(sidecar: SidecarProcess, token: str) -> int:
    """One request on a new connection (under `--workers N`, any worker may take it)."""
    return httpx.post(sidecar.url + "/pay/1", headers={"X-Client-Token": token}, timeout=10).status_code


def mint(sidecar: SidecarProcess) -> dict[str, Any]:
    response = httpx.post(f"{sidecar.admin_url}/admin/clients/{CLIENT}/tokens", headers=HEADERS, timeout=10)
    assert response.status_code == 201, response.text
    return dict(response.json())


def revoke(sidecar: SidecarProcess, token_id: str) -> httpx.Response:
    return httpx.delete(f"{sidecar.admin_url}/admin/clients/{CLIENT}/tokens/{token_id}", headers=HEADERS, timeout=10)


def seconds_until_refused(sidecar: SidecarProcess, token: str, limit: float = 1.0) -> float:
    started = time.monotonic()
    while pay(sidecar, token) == 200:
        assert time.monotonic() - started < limit, f"the revoked token was still accepted after {limit} s"
        time.sleep(0.01)
    return time.monotonic() - started


def readyz(sidecar: SidecarProcess) -> httpx.Response:
    return httpx.get(sidecar.admin_url + "/readyz", timeout=10)


def wait_readyz(sidecar: SidecarProcess, check: Any, timeout: float = 8.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = readyz(sidecar)
        assert response.status_code == 200, response.text  # Redis trouble never makes the process not ready
        body = dict(response.json())
        if check(body["redis"]) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.fixture
def two_sidecars(cluster: Cluster, upstream: str, tmp_path: Path) -> Iterator[tuple[SidecarProcess, SidecarProcess]]:
    path = write_config(tmp_path / "sidecar.yaml", upstream, cluster.url)
    with SidecarProcess(path) as first, SidecarProcess(path) as second:
        yield first, second


def test_fresh_sidecars_accept_a_client_token_at_once(cluster, upstream, tmp_path):
    """On a cluster, freshly started sidecars (one of them with two workers) accept a valid client token within
    a second of answering /healthz, with no /readyz probe to load the slot map for them."""
    path = write_config(tmp_path / "sidecar.yaml", upstream, cluster.url)
    for workers in (1, 2):
        spawned = time.monotonic()
        with SidecarProcess(path, workers=workers) as sidecar:
            healthy = time.monotonic()
            while (status := pay(sidecar, TOKEN)) != 200:
                assert time.monotonic() - healthy < 1.0, f"still {status} a second after start-up"
                time.sleep(0.02)
            accepted = time.monotonic()
            while time.monotonic() - healthy < 1.0:  # new connections: every worker gets some
                assert pay(sidecar, TOKEN) == 200
            metrics = httpx.get(sidecar.admin_url + "/metrics").text
            assert "sidecar_redis_cluster_ok 1.0" in metrics and "sidecar_redis_revocations_listening 1.0" in metrics
        print(f"\n[measure] --workers {workers}: first accepted token {accepted - healthy:.3f} s after /healthz, "
              f"{accepted - spawned:.3f} s after the process was spawned")


def test_a_sidecar_started_while_its_seed_node_is_down_recovers_by_itself(cluster, upstream, tmp_path):
    """Started while the only node its URL names is down (no slot map can be loaded), a sidecar answers 503, and
    once that node is back it accepts the client token within seconds by itself, with no /readyz probe."""
    seed = cluster.ports[1]
    url = cluster.url.replace(str(cluster.ports[0]), str(seed))
    with contextlib.ExitStack() as stack:
        cluster.kill(seed)
        try:
            sidecar = stack.enter_context(SidecarProcess(write_config(tmp_path / "sidecar.yaml", upstream, url)))
            assert pay(sidecar, TOKEN) == 503
        finally:
            cluster.restart(seed)
        back = time.monotonic()
        while pay(sidecar, TOKEN) != 200:
            assert time.monotonic() - back < 5.0, "still refusing 5 s after the cluster came back"
            time.sleep(0.05)


def test_revocation_reaches_the_other_sidecar_on_a_cluster(two_sidecars):
    """On a cluster: a token minted on one sidecar works on the other, and once its revocation is answered it is
    refused there within a second although that sidecar had it cached."""
    first, second = two_sidecars
    minted = mint(first)
    assert [pay(second, minted["token"]) for _ in range(3)] == [200, 200, 200]
    assert revoke(first, minted["id"]).status_code == 204
    assert pay(first, minted["token"]) == 401
    elapsed = seconds_until_refused(second, minted["token"])
    print(f"\n[measure] revocation answered on one sidecar -> refused on the other after {elapsed * 1000:.1f} ms")
    assert pay(second, minted["token"]) == 401


def test_revocation_while_the_clients_master_is_down_is_finished_by_a_retry(cluster, two_sidecars):
    """With the master holding the client's keys killed, revoking answers 503 (not 204, not 404); once it is back,
    the retried revocation answers 204 and the token is refused on both sidecars within a second; a further
    retry answers 204 again."""
    first, second = two_sidecars
    minted = mint(first)
    assert (pay(first, minted["token"]), pay(second, minted["token"])) == (200, 200)
    port = cluster.master_of(CLIENT_KEYS)
    cluster.kill(port)
    try:
        refused = revoke(first, minted["id"])
        assert refused.status_code == 503
        assert refused.json()["error"] == "dependency_unavailable"
    finally:
        cluster.restart(port)
    deadline = time.monotonic() + 5
    while (retried := revoke(first, minted["id"])).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert retried.status_code == 204
    assert pay(first, minted["token"]) == 401
    seconds_until_refused(second, minted["token"])
    assert revoke(second, minted["id"]).status_code == 204


def test_revocation_completes_when_a_master_holding_the_tokens_index_dies(cluster, two_sidecars):
    """With partial coverage allowed and the master holding the token's index (not the client's keys) killed, the
    revocation is complete and answered 204, and the token is refused on both sidecars at once; once the master is
    back the token is still refused (401) and a retry answers 204."""
    first, second = two_sidecars
    client_master = cluster.master_of(CLIENT_KEYS)
    minted = mint(first)
    while cluster.master_of(f"sidecar:token:{{{token_hash(minted['token'])}}}") == client_master:
        minted = mint(first)  # two chances in three each time
    index_master = cluster.master_of(f"sidecar:token:{{{token_hash(minted['token'])}}}")
    assert (pay(first, minted["token"]), pay(second, minted["token"])) == (200, 200)
    cluster.configure("cluster-require-full-coverage", "no")
    cluster.kill(index_master)
    try:
        assert revoke(first, minted["id"]).status_code == 204
        assert pay(first, minted["token"]) != 200
        seconds_until_refused(second, minted["token"])
    finally:
        cluster.restart(index_master)
        cluster.configure("cluster-require-full-coverage", "yes")
    assert (pay(first, minted["token"]), pay(second, minted["token"])) == (401, 401)
    assert revoke(first, minted["id"]).status_code == 204


def test_readyz_reports_a_failed_cluster_and_stays_ready(cluster, two_sidecars):
    """A master down: /readyz stays 200 and says cluster_state fail, which masters answer, what fails closed and
    since when; `sidecar_redis_cluster_ok` and `sidecar_redis_up` drop to 0; both come back when the master does."""
    first, _ = two_sidecars
    healthy = wait_readyz(first, lambda redis: redis["cluster_state"] == "ok")
    assert healthy == {"status": "ready", "report_only_routes": 0, "redis": {
        "mode": "cluster", "tls": False, "reachable": True, "revocations_channel": "listening",
        "since": healthy["redis"]["since"], "cluster_state": "ok", "masters": 3, "masters_ok": 3}}
    port = next(p for p in cluster.ports if p != cluster.master_of(CLIENT_KEYS))
    cluster.kill(port)
    try:
        # At once the dead master is unreachable; within ~1 s (cluster-node-timeout) the others say fail too.
        failed = wait_readyz(first, lambda redis: redis["masters_ok"] == 0)["redis"]
        assert failed["cluster_state"] == "fail"
        assert failed["reachable"] is False
        assert (failed["masters"], failed["masters_ok"]) == (3, 0)  # the others report cluster_state:fail too
        assert failed["error"].startswith("1 of 3 masters cannot be reached")
        assert "authenticator licence: client tokens" in failed["failing_closed"]
        assert failed["since"] >= healthy["redis"]["since"]
        metrics = httpx.get(first.admin_url + "/metrics").text
        assert "sidecar_redis_cluster_ok 0.0" in metrics
        assert "sidecar_redis_up 0.0" in metrics
    finally:
        cluster.restart(port)
    back = wait_readyz(first, lambda redis: redis["cluster_state"] == "ok")["redis"]
    assert (back["cluster_state"], back["reachable"], back["masters_ok"]) == ("ok", True, 3)
    assert "sidecar_redis_cluster_ok 1.0" in httpx.get(first.admin_url + "/metrics").text
    assert pay(first, TOKEN) == 200


def test_tls_cluster_with_password_and_client_certificate(tls_cluster, upstream, tmp_path):
    """`rediss+cluster://` with a password, a CA and a client certificate: a fresh sidecar accepts the YAML token,
    mints and revokes a token, and /readyz says TLS, reachable, cluster ok."""
    path = write_config(tmp_path / "sidecar.yaml", upstream, tls_cluster.url)
    with SidecarProcess(path) as sidecar:
        assert pay(sidecar, TOKEN) == 200
        minted = mint(sidecar)
        assert pay(sidecar, minted["token"]) == 200
        assert revoke(sidecar, minted["id"]).status_code == 204
        assert pay(sidecar, minted["token"]) == 401
        redis = wait_readyz(sidecar, lambda redis: redis["cluster_state"] == "ok")["redis"]
        assert (redis["mode"], redis["tls"], redis["reachable"]) == ("cluster", True, True)


def test_tls_cluster_with_a_wrong_ca_fails_closed_with_a_clear_error(tls_cluster, upstream, tmp_path):
    """A CA that did not sign the cluster's certificates: the sidecar starts, client tokens answer 503, and /readyz
    and the log say the TLS certificate could not be verified."""
    other = make_tls(tmp_path / "other", "other")
    url = tls_cluster.url.replace(str(tls_cluster.tls.ca), str(other.ca))
    path = write_config(tmp_path / "sidecar.yaml", upstream, url)
    with SidecarProcess(path) as sidecar:
        assert pay(sidecar, TOKEN) == 503
        redis = readyz(sidecar).json()["redis"]
        assert redis["reachable"] is False
        assert redis["error"].startswith("TLS certificate verification failed"), redis["error"]
        assert "check ssl_ca_certs" in redis["error"]
        sidecar.process.terminate()
        sidecar.process.wait(15)
        log = sidecar.process.stderr.read().decode()
    assert "TLS certificate verification failed" in log
    assert PASSWORD not in log


@pytest.fixture(scope="module")
def tls_deployment(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Sentinel]:
    """A TLS master with a password and a TLS Sentinel with its own password, both wanting client certificates."""
    sentinel = start_sentinel(tmp_path_factory.mktemp("tls-sentinel"), tls=tls, password="master-pass",
                              sentinel_password="sentinel-pass")
    try:
        yield sentinel
    finally:
        sentinel.stop()


@pytest.fixture
def tls_sentinel(tls_deployment: Sentinel) -> str:
    return tls_deployment.url


def test_tls_standalone_with_password_and_client_certificate(tls_deployment, tls, upstream, tmp_path):
    """`rediss://` straight to the TLS master, with its password, a CA and a client certificate: tokens are
    accepted, minted and revoked, and /readyz says one server over TLS, reachable."""
    url = f"rediss://:master-pass@127.0.0.1:{tls_deployment.master_port}/0?{tls.client_query()}"
    with SidecarProcess(write_config(tmp_path / "sidecar.yaml", upstream, url)) as sidecar:
        assert pay(sidecar, TOKEN) == 200
        minted = mint(sidecar)
        assert pay(sidecar, minted["token"]) == 200
        assert revoke(sidecar, minted["id"]).status_code == 204
        assert pay(sidecar, minted["token"]) == 401
        redis = readyz(sidecar).json()["redis"]
        assert (redis["mode"], redis["tls"], redis["reachable"]) == ("standalone", True, True)


def test_tls_sentinel_with_credentials(tls_sentinel, upstream, tmp_path):
    """`rediss+sentinel://` with the master's password, the sentinels' password, a CA and a client certificate:
    tokens are accepted, minted and revoked, and /readyz says Sentinel over TLS, reachable."""
    path = write_config(tmp_path / "sidecar.yaml", upstream, tls_sentinel)
    with SidecarProcess(path) as sidecar:
        assert pay(sidecar, TOKEN) == 200
        minted = mint(sidecar)
        assert pay(sidecar, minted["token"]) == 200
        assert revoke(sidecar, minted["id"]).status_code == 204
        assert pay(sidecar, minted["token"]) == 401
        redis = readyz(sidecar).json()["redis"]
        assert (redis["mode"], redis["tls"], redis["reachable"], redis["revocations_channel"]) == \
            ("sentinel", True, True, "listening")


def test_tls_sentinel_with_a_wrong_ca_fails_closed_with_a_clear_error(tls_sentinel, upstream, tmp_path):
    """Through Sentinel with a CA that did not sign its certificate: 503 for client tokens and a clear error."""
    other = make_tls(tmp_path / "other", "other")
    url = tls_sentinel.replace(str(parse_redis_url(tls_sentinel).ca_file), str(other.ca))
    with SidecarProcess(write_config(tmp_path / "sidecar.yaml", upstream, url)) as sidecar:
        assert pay(sidecar, TOKEN) == 503
        error = readyz(sidecar).json()["redis"]["error"]
        assert error.startswith("no sentinel answers for 'mymaster': TLS certificate verification failed"), error


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/6", ("standalone", False, ((("127.0.0.1", 6379),)), 6, "")),
    ("rediss://:pw@cache.internal/2?ssl_ca_certs=/ca.pem", ("standalone", True, (("cache.internal", 6379),), 2, "")),
    ("redis+sentinel://a:26379,b/mymaster/3", ("sentinel", False, (("a", 26379), ("b", 26379)), 3, "mymaster")),
    ("rediss+sentinel://s:1/m?sentinel_password=x", ("sentinel", True, (("s", 1),), 0, "m")),
    ("redis+cluster://n1:7000,n2:7001", ("cluster", False, (("n1", 7000), ("n2", 7001)), 0, "")),
    ("rediss+cluster://user:pw@[::1]:7000/0", ("cluster", True, (("::1", 7000),), 0, "")),
])
def test_redis_url_forms(url, expected):
    """Each supported URL form says which deployment, TLS or not, which hosts, database and Sentinel service."""
    target = parse_redis_url(url)
    assert (target.mode, target.tls, target.hosts, target.db, target.service) == expected


def test_redis_url_credentials_and_tls_files():
    """User, password (percent-decoded), the sentinels' credentials and the TLS files come from the URL."""
    target = parse_redis_url("rediss+sentinel://app:p%40ss%2Fword@s:26379/m/1?sentinel_username=watch&"
                             "sentinel_password=s%26p&ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/c.key&"
                             "ssl_check_hostname=false")
    assert (target.username, target.password, target.sentinel_username, target.sentinel_password) == \
        ("app", "p@ss/word", "watch", "s&p")
    assert (target.ca_file, target.cert_file, target.key_file, target.check_hostname) == \
        ("/etc/ca.pem", "/c.pem", "/c.key", False)
    assert "p@ss" not in repr(target)


@pytest.mark.parametrize(("url", "message"), [
    ("http://cache:6379", "redis must be a URL"),
    ("redis+cluster://n1:7000/3", "only database 0"),
    ("redis+sentinel://s:26379", "names the service"),
    ("redis://a:1,b:2/0", "names one server"),
    ("redis://:secret@cache:6379/0?ssl_ca_certs=/ca.pem", "needs TLS"),
    ("rediss+cluster://:secret@cache:6379?socket_timeout=9", "unknown redis URL parameter 'socket_timeout'"),
    ("redis://:secret@cache:99999/0", "invalid port"),
])
def test_bad_redis_urls_are_refused_without_repeating_the_password(url, message):
    """A URL that cannot work is refused with a message saying why, never containing the password."""
    with pytest.raises(ValueError, match=message) as refused:
        parse_redis_url(url)
    assert "secret" not in str(refused.value)


def test_check_refuses_an_unreadable_ca_file(tmp_path):
    """`sidecar check` (config load) refuses a TLS URL whose CA file cannot be read, naming the parameter."""
    path = write_config(tmp_path / "sidecar.yaml", "http://127.0.0.1:9",
                        f"rediss+cluster://127.0.0.1:7000?ssl_ca_certs={tmp_path}/missing.pem")
    with pytest.raises(ConfigError) as refused:
        load(str(path))
    assert any("ssl_ca_certs" in error and "cannot read" in error for error in refused.value.errors)
    checked = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)], capture_output=True,
                             text=True)
    assert checked.returncode != 0
    assert "ssl_ca_certs" in checked.stdout + checked.stderr
