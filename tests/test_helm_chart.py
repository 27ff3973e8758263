"""Static checks of the Helm chart (helm/sidecar) and the Dockerfile.

Helm is rarely installed where the tests run, so the templates are also read without it: named templates
included with `nindent` are expanded, simple `.Values.a.b` references are replaced by values.yaml's
values, other actions by a placeholder, and lines made only of actions (if, end, with, range, toYaml...)
are dropped. Every branch is therefore kept, including disabled features, so every template must parse
that way. When `helm` is on PATH (or the helm-python-sdk package is installed) the chart is also rendered
for real and the same assertions run on the output.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "sidecar"
TEMPLATES = CHART / "templates"
DOCKERFILE = ROOT / "Dockerfile"
PLACEHOLDER = "TEMPLATED"

COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.DOTALL)
ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
ONLY_ACTIONS = re.compile(r"(?:\{\{.*?\}\}\s*)+")
INCLUDE_NINDENT = re.compile(r'\{\{-?\s*include\s+"(?P<name>[^"]+)"\s+.*?\|\s*nindent\s+(?P<indent>\d+)\s*-?\}\}')
VALUE_REF = re.compile(r"\$?\.Values((?:\.\w+)+)(\s*\|\s*quote)?")
VALUE_PATH = re.compile(r"\$?\.Values((?:\.\w+)+)")
BLOCK_OPENERS = {"define", "if", "with", "range", "block"}
_MISSING = object()


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _lookup(values: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(values, dict) or key not in values:
            return _MISSING
        values = values[key]
    return values


def _go_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _resolve(action: re.Match[str], values: dict[str, Any]) -> str:
    ref = VALUE_REF.fullmatch(action.group(1))
    if ref:
        value = _lookup(values, ref.group(1)[1:].split("."))
        if value is not _MISSING and value is not None and not isinstance(value, dict | list):
            text = _go_string(value)
            return json.dumps(text) if ref.group(2) else text
    return PLACEHOLDER


def _defines() -> dict[str, str]:
    """Return the body of every `define` in the chart's templates, by name."""
    found: dict[str, str] = {}
    for path in sorted(TEMPLATES.glob("*.tpl")):
        text = COMMENT.sub("", path.read_text())
        stack: list[tuple[str, str, int]] = []
        for action in ACTION.finditer(text):
            words = action.group(1).split()
            keyword = words[0] if words else ""
            if keyword in BLOCK_OPENERS:
                name = words[1].strip('"') if keyword == "define" else ""
                stack.append((keyword, name, action.end()))
            elif keyword == "end":
                opener, name, start = stack.pop()
                if opener == "define":
                    found[name] = text[start : action.start()]
        assert not stack, f"{path.name}: unbalanced blocks {stack}"
    return found


def _render_static(text: str, values: dict[str, Any], defines: dict[str, str], depth: int = 0) -> str:
    assert depth < 10, "include recursion too deep"
    lines: list[str] = []
    for line in COMMENT.sub("", text).splitlines():
        stripped = line.strip()
        include = INCLUDE_NINDENT.fullmatch(stripped)
        if include and include.group("name") in defines:
            body = _render_static(defines[include.group("name")], values, defines, depth + 1)
            pad = " " * int(include.group("indent"))
            lines.extend(pad + body_line for body_line in body.splitlines() if body_line.strip())
        elif not ONLY_ACTIONS.fullmatch(stripped):
            lines.append(ACTION.sub(lambda action: _resolve(action, values), line))
    return "\n".join(lines)


def _static_docs(template: str) -> list[dict[str, Any]]:
    text = _render_static((TEMPLATES / template).read_text(), _values(), _defines())
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [doc for doc in docs if doc.get("kind") == kind]
    assert len(matching) == 1, f"expected one {kind}, got {[doc.get('kind') for doc in docs]}"
    return matching[0]


def _env_names(container: dict[str, Any]) -> set[str]:
    return {entry["name"] for entry in container.get("env") or []}


def _check_deployment(deployment: dict[str, Any], admin_port: int, decision_port: int = 9100) -> None:
    assert deployment["apiVersion"] == "apps/v1"
    pod = deployment["spec"]["template"]
    assert "checksum/config" in pod["metadata"]["annotations"]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "terminationGracePeriodSeconds" in spec
    (container,) = [c for c in spec["containers"] if c["name"] == "sidecar"]

    # the `metrics` port exists only with metricsPort > 0, `decision` only in decision mode (the static render keeps
    # every branch)
    ports = {port["containerPort"]: port["name"] for port in container["ports"]
             if not port["name"].endswith("metrics")}
    assert set(ports) - {decision_port} == {8080, admin_port}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path
        assert http_get["port"] in (admin_port, ports[admin_port]), f"{probe} is not on the admin port"

    args = container["args"]
    assert args[:3] == ["run", "--config", "/etc/sidecar/sidecar.yaml"]
    assert args[args.index("--admin-port") + 1] == str(admin_port)
    assert "--workers" in args
    assert "SIDECAR_ADMIN_HOST" in _env_names(container)

    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "configMap" in volumes[mounts["/etc/sidecar"]]


def _check_hpa(hpa: dict[str, Any]) -> None:
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def _check_pdb(pdb: dict[str, Any]) -> None:
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1


# --- Static checks: no helm needed ----------------------------------------------------------------------


def test_every_template_parses_statically():
    """Every template file parses as YAML once its template actions are resolved."""
    for path in sorted(TEMPLATES.glob("*.yaml")):
        docs = _static_docs(path.name)
        assert len(docs) == 1, path.name
        assert {"apiVersion", "kind", "metadata"} <= set(docs[0]), path.name


def test_static_render_drops_control_lines_and_substitutes_values():
    """The static renderer keeps branches, expands nindent includes and fills in simple values."""
    text = (
        "{{- if .Values.autoscaling.enabled }}\nkind: X\nspec:\n"
        '  {{- include "t.inner" . | nindent 2 }}\n'
        "  port: {{ .Values.containerPorts.admin | quote }}\n  other: {{ .Values.nope }}\n{{- end }}\n"
    )
    rendered = _render_static(text, _values(), {"t.inner": "\nname: {{ .Values.image.repository }}\n"})
    doc = yaml.safe_load(rendered)
    assert doc == {"kind": "X", "spec": {"name": "sidecar", "port": "9901", "other": PLACEHOLDER}}


def test_deployment_probes_security_and_mounts():
    """The Deployment probes /healthz and /readyz on the admin port and runs locked down."""
    deployment = _one(_static_docs("deployment.yaml"), "Deployment")
    _check_deployment(deployment, admin_port=_values()["containerPorts"]["admin"])


def test_deployment_maps_secrets_and_redis_to_environment():
    """SIDECAR_ADMIN_TOKEN, SIDECAR_SIGNING_KEY, SIDECAR_KEYS_SECRET and SIDECAR_REDIS_URL come from values."""
    deployment = _one(_static_docs("deployment.yaml"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = _env_names(container)
    assert {"SIDECAR_ADMIN_TOKEN", "SIDECAR_SIGNING_KEY", "SIDECAR_KEYS_SECRET", "SIDECAR_REDIS_URL"} <= names
    refs = [entry["valueFrom"]["secretKeyRef"] for entry in container["env"] if "valueFrom" in entry]
    assert {"name": PLACEHOLDER, "key": "admin-token"} in refs


def test_hpa_and_pdb_templates():
    """An autoscaling/v2 HPA on CPU and a policy/v1 PDB with minAvailable 1 exist and are on by default."""
    _check_hpa(_one(_static_docs("hpa.yaml"), "HorizontalPodAutoscaler"))
    _check_pdb(_one(_static_docs("pdb.yaml"), "PodDisruptionBudget"))
    values = _values()
    assert values["autoscaling"]["enabled"] is True
    assert values["podDisruptionBudget"]["enabled"] is True


def test_configmap_holds_sidecar_yaml():
    """The ConfigMap has a sidecar.yaml key, mounted by the Deployment at /etc/sidecar."""
    configmap = _one(_static_docs("configmap.yaml"), "ConfigMap")
    assert "sidecar.yaml" in configmap["data"]


def test_default_config_is_a_valid_minimal_policy():
    """The default config is version 1 with one public route whose authenticators are all defined."""
    config = yaml.safe_load(_values()["config"])
    assert config["version"] == 1
    assert config["upstream"] == "http://127.0.0.1:8081"
    assert config["authenticators"] == {"public": {"type": "anonymous"}}
    assert config["routes"] == [{"id": "all", "match": {"path": "/**"}, "auth": ["public"]}]


def test_optional_resources_are_off_by_default_and_parse():
    """ServiceMonitor and NetworkPolicy are disabled by default and well-formed when enabled."""
    values = _values()
    assert values["serviceMonitor"]["enabled"] is False
    assert values["networkPolicy"]["enabled"] is False
    monitor = _one(_static_docs("servicemonitor.yaml"), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] in ("admin", PLACEHOLDER)  # "metrics" with metricsPort > 0
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    policy = _one(_static_docs("networkpolicy.yaml"), "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"


def test_service_and_service_account():
    """The Service exposes http and admin; the ServiceAccount is created without a mounted token."""
    service = _one(_static_docs("service.yaml"), "Service")
    assert {port["name"]: port["targetPort"] for port in service["spec"]["ports"] if port["name"] != "metrics"} == {
        "http": "http",
        "admin": "admin",
        "decision": "decision",  # kept by the static renderer; only with mode decision or both (see below)
    }
    account = _one(_static_docs("serviceaccount.yaml"), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert _values()["serviceAccount"]["create"] is True


def test_decision_mode_adds_port_argument_service_port_and_network_policy_rule():
    """mode decision/both: --decision-port and SIDECAR_DECISION_HOST, a `decision` container and Service port, and
    a NetworkPolicy rule admitting only networkPolicy.decisionFrom to it; all guarded by `ne .Values.mode "proxy"`."""
    values = _values()
    assert values["mode"] == "proxy"
    assert values["networkPolicy"]["decisionFrom"] == []
    deployment = _one(_static_docs("deployment.yaml"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--decision-port") + 1] == "9100"
    assert {"name": PLACEHOLDER + "decision", "containerPort": 9100, "protocol": "TCP"} in container["ports"]  # $prefix
    assert {"name": "SIDECAR_DECISION_HOST", "value": "0.0.0.0"} in container["env"]
    service = _one(_static_docs("service.yaml"), "Service")
    assert {"name": "decision", "port": 9100, "targetPort": "decision", "protocol": "TCP"} in service["spec"]["ports"]
    policy = _one(_static_docs("networkpolicy.yaml"), "NetworkPolicy")
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert "from" in rules["decision"]  # networkPolicy.decisionFrom (toYaml, dropped statically), never "any"
    for name in ("_sidecar-container.tpl", "service.yaml", "networkpolicy.yaml"):
        text = (TEMPLATES / name).read_text()
        assert text.count('{{- if ne .Values.mode "proxy" }}') >= 1, name
    assert '(list "proxy" "decision" "both")' in (TEMPLATES / "_sidecar-container.tpl").read_text()


def test_sidecar_container_template_is_reusable():
    """The sidecar.container and sidecar.volumes templates a backend chart includes are defined."""
    defines = _defines()
    assert {"sidecar.container", "sidecar.volumes", "sidecar.configChecksum"} <= set(defines)
    assert "sidecarMode" in _values()


def test_templates_reference_only_defined_values():
    """Every absolute .Values path used by a template exists in values.yaml (a typo renders empty)."""
    values = _values()
    for path in sorted(TEMPLATES.iterdir()):
        for match in VALUE_PATH.finditer(COMMENT.sub("", path.read_text())):
            assert _lookup(values, match.group(1)[1:].split(".")) is not _MISSING, f"{path.name}: {match.group(0)}"


def _documented_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict):
            paths.extend(_documented_paths(value, f"{path}."))
    return paths


def test_readme_documents_every_value():
    """Every value is in README.md's table, itself or through a documented parent map."""
    documented = set(re.findall(r"^\|\s*`([^`]+)`", (CHART / "README.md").read_text(), re.MULTILINE))
    values = _values()
    for path in _documented_paths(values):
        parts = path.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        leaf = not isinstance(_lookup(values, parts), dict) or not _lookup(values, parts)
        if leaf:
            assert parents & documented, f"{path} is not documented in helm/sidecar/README.md"


# --- Dockerfile -----------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_and_non_root():
    """The image builds in two stages and runs as a numeric non-root user."""
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), users[-1]
    final_stage = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM") :]
    assert not any("apt-get install" in rest for keyword, rest in final_stage if keyword == "RUN")


def test_dockerfile_healthcheck_entrypoint_and_ports():
    """HEALTHCHECK hits the admin /healthz with urllib; ENTRYPOINT, CMD and EXPOSE match the chart."""
    instructions = dict(_dockerfile_instructions())
    assert "urllib" in instructions["HEALTHCHECK"]
    assert "http://127.0.0.1:9901/healthz" in instructions["HEALTHCHECK"]
    assert json.loads(instructions["ENTRYPOINT"]) == ["sidecar"]
    cmd = json.loads(instructions["CMD"])
    assert cmd[:3] == ["run", "--config", "/etc/sidecar/sidecar.yaml"]
    assert cmd[cmd.index("--admin-port") + 1] == "9901"
    assert instructions["EXPOSE"].split() == ["8080", "9901"]
    env = " ".join(rest for keyword, rest in _dockerfile_instructions() if keyword == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "SIDECAR_ADMIN_HOST=0.0.0.0"):
        assert setting in env


# --- Rendered by Helm, when available ------------------------------------------------------------------

HELM = shutil.which("helm")


def _helm_python() -> Any:
    try:
        import helm_python
    except ImportError:
        return None
    return helm_python


def _render(tmp_path: Path, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    if HELM:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(overrides))
        result = subprocess.run(
            [HELM, "template", "demo", str(CHART), "--namespace", "prod", "-f", str(values_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        texts = [result.stdout]
    else:
        sdk = _helm_python()
        if sdk is None:
            pytest.skip("neither helm nor helm-python-sdk is installed")
        with sdk.Chart.load(str(CHART)) as chart:
            rendered = chart.render(overrides, name="demo", namespace="prod")
        texts = [text for name, text in rendered.items() if name.endswith(".yaml")]
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def test_helm_renders_defaults(tmp_path):
    """With Helm: the default release has the locked-down Deployment, HPA, PDB, ConfigMap and Service."""
    docs = _render(tmp_path, {})
    assert sorted(doc["kind"] for doc in docs) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    deployment = _one(docs, "Deployment")
    _check_deployment(deployment, admin_port=9901)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    _check_hpa(_one(docs, "HorizontalPodAutoscaler"))
    _check_pdb(_one(docs, "PodDisruptionBudget"))
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["sidecar.yaml"])
    assert config == yaml.safe_load(_values()["config"])


def test_helm_renders_secrets_redis_and_optional_resources(tmp_path):
    """With Helm: secrets, a sentinel Redis URL, the ServiceMonitor and the NetworkPolicy render."""
    docs = _render(
        tmp_path,
        {
            "secrets": {"existingSecret": "sc", "webhookSecrets": [{"env": "ERP_WEBHOOK_SECRET", "key": "erp"}]},
            "redis": {"mode": "sentinel", "host": "sentinel"},
            "serviceMonitor": {"enabled": True},
            "networkPolicy": {"enabled": True},
            "workers": 4,
        },
    )
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["SIDECAR_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "sc", "key": "admin-token"}
    assert env["ERP_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "sc", "key": "erp"}
    assert env["SIDECAR_REDIS_URL"]["value"] == "redis+sentinel://sentinel:26379/mymaster/0"
    assert container["args"][container["args"].index("--workers") + 1] == "4"
    assert _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"
    _one(docs, "NetworkPolicy")


@pytest.mark.parametrize(
    ("redis", "url"),
    [
        ({"url": "redis://r:6379/0"}, "redis://r:6379/0"),
        ({"mode": "standalone", "host": "r"}, "redis://r:6379/0"),
        ({"mode": "standalone", "host": "r", "tls": True, "port": 6380, "db": 2}, "rediss://r:6380/2"),
        ({"mode": "cluster", "host": "rc"}, "redis+cluster://rc:6379"),
        ({"mode": "cluster", "host": "rc", "tls": True}, "rediss+cluster://rc:6379"),
        ({"mode": "sentinel", "host": "s", "tls": True}, "rediss+sentinel://s:26379/mymaster/0"),
    ],
)
def test_helm_builds_redis_urls(tmp_path, redis, url):
    """With Helm: redis.url, or the URL built from redis.mode, becomes SIDECAR_REDIS_URL."""
    (container,) = _one(_render(tmp_path, {"redis": redis}), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {entry["name"]: entry.get("value") for entry in container["env"]}["SIDECAR_REDIS_URL"] == url


def test_helm_sidecar_mode_renders_only_the_configmap(tmp_path):
    """With Helm: in sidecar mode the chart renders the ConfigMap alone, for the backend's pod."""
    docs = _render(tmp_path, {"sidecarMode": {"enabled": True}})
    assert [doc["kind"] for doc in docs] == ["ConfigMap"]


def _derived_memory_mi(values: dict[str, Any], workers: int) -> int:
    """The formula documented in values.yaml."""
    budget = values["memoryBudget"]
    per_worker = budget["workerMi"] + budget["cacheMi"] * 3 // 2 + budget["inFlightMi"]
    return workers * per_worker + (budget["supervisorMi"] if workers > 1 else 0)


def test_memory_budget_defaults_fit_the_cache_budget():
    """The default config takes cache.max_bytes from SIDECAR_CACHE_MAX_BYTES, whose default is memoryBudget.cacheMi;
    the derived limit (176Mi for one worker, 448Mi for two) leaves a worker its measured ~75 MiB plus the cache."""
    values = _values()
    config = yaml.safe_load(values["config"])
    cache_bytes = values["memoryBudget"]["cacheMi"] << 20
    assert config["cache"]["max_bytes"] == f"${{SIDECAR_CACHE_MAX_BYTES:-{cache_bytes}}}"
    assert not values["resources"]["limits"].get("memory"), "the limit is derived unless set"
    assert (_derived_memory_mi(values, 1), _derived_memory_mi(values, 2)) == (176, 448)
    budget = values["memoryBudget"]
    assert budget["workerMi"] >= 75 + 16 and budget["cacheMi"] >= 16
    container = (TEMPLATES / "_sidecar-container.tpl").read_text()
    assert 'include "sidecar.memoryLimit"' in container and "SIDECAR_CACHE_MAX_BYTES" in container


@pytest.mark.parametrize(("workers", "memory"), [(1, None), (2, None), (2, "1Gi")])
def test_helm_derives_the_memory_limit(tmp_path, workers, memory):
    """With Helm: the container's memory limit follows workers and memoryBudget unless set explicitly, and
    SIDECAR_CACHE_MAX_BYTES carries the cache budget."""
    overrides: dict[str, Any] = {"workers": workers}
    if memory:
        overrides["resources"] = {"limits": {"memory": memory}}
    container = _one(_render(tmp_path, overrides), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    expected = memory or f"{_derived_memory_mi(_values(), workers)}Mi"
    assert container["resources"]["limits"]["memory"] == expected
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["SIDECAR_CACHE_MAX_BYTES"] == str(_values()["memoryBudget"]["cacheMi"] << 20)
