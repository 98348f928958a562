"""kubernetes/: the base and the example overlay rendered by kustomize (`kubectl kustomize`),
every object validated offline against the Kubernetes OpenAPI schemas of two releases
(`kubernetes-validate`, strict: an unknown field is an error), and what the fleet shape relies
on asserted on the rendered objects. Plus the Containerfile's pins and the probe command."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lorawarm import __version__
from lorawarm.metrics import Metrics
from lorawarm.status import create_app
from tests.unit.test_status_api import make_source

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "kubernetes"
# Two recent releases whose schemas kubernetes-validate bundles (native sidecars: 1.29+).
VERSIONS = ["1.34.0", "1.37.0"]
LAYOUTS = ["base", "overlays/example"]


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is missing: `make ops-tools` installs one"
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=LAYOUTS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUBERNETES / request.param)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def containers(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the lorawarm sidecar, the vLLM container)."""
    spec = pod(docs)
    [sidecar] = [c for c in spec["initContainers"] if c["name"] == "lorawarm"]
    [vllm] = [c for c in spec["containers"] if c["name"] == "vllm"]
    return sidecar, vllm


def env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then `env`
    (which wins); a value from a Secret shows as its secretKeyRef."""
    values: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        values.update(one(docs, "ConfigMap", name)["data"])
    for item in container.get("env", []):
        values[item["name"]] = item.get("value", item.get("valueFrom"))
    return values


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def flag(args: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_validates(
    rendered: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    """Each object kustomize renders is valid for the Kubernetes release (strict schema)."""
    _, docs = rendered
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ServiceAccount", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_misspelt_field() -> None:
    """The schema check is not vacuous: a misspelt field of the sidecar is refused."""
    docs = render(KUBERNETES / "base")
    deployment = one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_lorawarm_is_a_native_sidecar_sharing_the_volumes(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """lorawarm runs as an init container with restartPolicy Always (started first, kept
    running), and shares the drop and state directories with vLLM on emptyDir volumes, at
    the paths both are configured with."""
    _, docs = rendered
    sidecar, vllm = containers(docs)
    assert sidecar["restartPolicy"] == "Always"
    volumes = {v["name"]: v for v in pod(docs)["volumes"]}
    side_env, vllm_env = env(sidecar, docs), env(vllm, docs)
    for volume, setting in (("adapters", "LORAWARM_CACHE_DIR"), ("state", "LORAWARM_STATE_DIR")):
        assert "emptyDir" in volumes[volume]
        assert mounts(sidecar)[volume] == mounts(vllm)[volume]
        assert side_env[setting] == vllm_env[setting] == mounts(vllm)[volume]
    vllm_mounts = {m["name"]: m for m in vllm["volumeMounts"]}
    assert vllm_mounts["adapters"].get("readOnly") is True  # only the sidecar writes adapters
    assert vllm_mounts["state"].get("readOnly") is not True  # the plugin writes snapshots


def test_vllm_container_has_what_the_plugin_needs(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """vLLM loads the lorawarm plugin (resolver and the endpoint the sidecar learns the
    server from) with runtime LoRA updating and LoRA on, and no setting repeats a vLLM flag
    (they could disagree); the sidecar warms that same vLLM."""
    _, docs = rendered
    sidecar, vllm = containers(docs)
    values = env(vllm, docs)
    assert values["VLLM_PLUGINS"] == "lorawarm"
    assert values["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert "--enable-lora" in vllm["args"]
    assert flag(vllm["args"], "--max-lora-rank")
    learned = {"LORAWARM_MAX_LORA_RANK", "LORAWARM_SERVED_MODEL_NAMES", "LORAWARM_BASE_MODEL"}
    assert not learned & (set(values) | set(env(sidecar, docs)))
    port = int(flag(vllm["args"], "--port"))
    assert env(sidecar, docs)["LORAWARM_VLLM_URLS"] == f"http://127.0.0.1:{port}"
    assert [p["containerPort"] for p in vllm["ports"]] == [port]
    assert sidecar["image"] == vllm["image"]  # one image: the plugin is inside vLLM's env


def test_probes_point_at_real_routes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """vLLM's probes ask its /health on its port; lorawarm's run the probe command on routes
    the status API has (/healthz for liveness, /readyz for start-up and readiness)."""
    _, docs = rendered
    sidecar, vllm = containers(docs)
    named = {p["name"]: p["containerPort"] for p in vllm["ports"]}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = vllm[kind]["httpGet"]
        assert get["path"] == "/health"
        assert named[get["port"]] == int(flag(vllm["args"], "--port"))
    routes = {getattr(r, "path", None) for r in create_app(make_source()).routes}
    expected = {"startupProbe": "/readyz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for kind, path in expected.items():
        command = sidecar[kind]["exec"]["command"]
        assert command == ["python3", "-m", "lorawarm.probe", path]
        assert path in routes


def test_containers_are_hardened(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, every capability
    dropped, the runtime's seccomp profile, and no Kubernetes API token mounted."""
    _, docs = rendered
    spec = pod(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for container in containers(docs):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["privileged"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in mounts(container).values()  # writable scratch under a read-only root


def test_s3_source_and_credentials(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """The sidecar reads an s3:// source, its credentials from the lorawarm-s3 Secret (which
    may be absent: workload identity through the service account then)."""
    _, docs = rendered
    sidecar, _ = containers(docs)
    values = env(sidecar, docs)
    assert values["LORAWARM_SOURCES"].startswith("s3://")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = {"name": "lorawarm-s3", "key": key, "optional": True}
        assert values[key] == {"secretKeyRef": ref}
    assert pod(docs)["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_status_api_leaves_the_pod_only_with_a_token(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """The base binds the status API to loopback and exposes no port for it; the overlay
    binds the pod's address only together with a required token Secret."""
    layout, docs = rendered
    sidecar, _ = containers(docs)
    values = env(sidecar, docs)
    token = values["LORAWARM_STATUS_TOKEN"]["secretKeyRef"]
    status_port = int(values["LORAWARM_STATUS_PORT"])
    targets = [p for s in docs if s["kind"] == "Service" for p in s["spec"]["ports"]]
    if layout == "base":
        assert values["LORAWARM_STATUS_HOST"] == "127.0.0.1"
        assert "ports" not in sidecar
        assert all(p["port"] != status_port for p in targets)
    else:
        assert values["LORAWARM_STATUS_HOST"] == "0.0.0.0"
        assert token["optional"] is False
        assert [p["containerPort"] for p in sidecar["ports"]] == [status_port]


def test_prometheus_annotations_name_a_port_serving_metrics(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """The scrape annotations point at a container port of the pod that serves /metrics:
    vLLM's in the base, lorawarm's (behind the token) in the overlay."""
    layout, docs = rendered
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    sidecar, vllm = containers(docs)
    port = int(annotations["prometheus.io/port"])
    serving = vllm if layout == "base" else sidecar
    assert port in [p["containerPort"] for p in serving["ports"]]
    if serving is sidecar:
        assert "lorawarm_adapters" in {f.name for f in Metrics().registry.collect()}


def test_overlay_runs_several_replicas_on_one_bucket() -> None:
    """The example fleet: several replicas, each syncing the same bucket into its own drop
    directory (emptyDir: per pod)."""
    docs = render(KUBERNETES / "overlays/example")
    assert one(docs, "Deployment")["spec"]["replicas"] >= 2
    sidecar, _ = containers(docs)
    assert re.fullmatch(r"s3://[a-z0-9.-]+/.+/", env(sidecar, docs)["LORAWARM_SOURCES"])


def test_containerfile_pins_match_the_project() -> None:
    """The Containerfile builds on the vLLM release the tests pin, installs the wheel `make
    dist` builds, and makes the image tag the manifests use."""
    text = (ROOT / "Containerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [pin] = [d for d in pyproject["project"]["optional-dependencies"]["e2e"] if "vllm" in d]
    vllm_version = pin.split("==")[1]
    assert f"ARG VLLM_VERSION=v{vllm_version}\n" in text
    assert "FROM vllm/vllm-openai:${VLLM_VERSION}" in text
    assert "COPY dist/lorawarm-*-py3-none-any.whl" in text
    assert re.search(r"^USER (\d+)", text, re.MULTILINE)
    tag = f"v{vllm_version}-lorawarm{__version__}"
    kustomization = yaml.safe_load((KUBERNETES / "base/kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "vllm-lorawarm", "newTag": tag}]
    assert f"vllm-lorawarm:{tag}" in text


def test_scrape_job_matches_the_overlay_and_the_alerts() -> None:
    """The example scrape job is the `lorawarm` job LorawarmDown watches, sends the token,
    and keeps the pods' port named as the overlay names lorawarm's status port. (Debian's
    promtool is built without Kubernetes discovery, so this file is checked here, not by
    `promtool check config`.)"""
    scrape = yaml.safe_load((ROOT / "monitoring/prometheus-scrape.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["job_name"] == "lorawarm"
    assert job["authorization"]["type"] == "Bearer"
    assert "credentials_file" in job["authorization"]
    rules = (ROOT / "monitoring/lorawarm-alerts.yml").read_text()
    assert 'up{job="lorawarm"}' in rules
    kept = {r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    docs = render(KUBERNETES / "overlays/example")
    sidecar, _ = containers(docs)
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert {p["name"] for p in sidecar["ports"]} <= kept
    assert labels["app.kubernetes.io/name"] in kept
