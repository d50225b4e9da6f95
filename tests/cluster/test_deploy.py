"""deploy/: the Kubernetes manifests validate against Kubernetes' schemas (offline), agree with each other,
and pass llmctl's own argument parsing; the Dockerfiles install and run what the manifests use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli.app import app, load_command

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The oldest Kubernetes release still commonly run, and the newest the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    (doc,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes_strictly(version):
    docs = documents()
    assert {d["kind"] for d in docs} == {"Secret", "Service", "StatefulSet", "Deployment"}
    for doc in docs:
        # strict: a misspelt or misplaced field is an error, as kubectl's server-side validation makes it.
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_wrong_field_is_caught():
    """The validation above can fail: a typo in a probe is rejected."""
    broken = json.loads(json.dumps(find("StatefulSet", "llmctl-worker")))
    container(broken)["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_router_names_every_replica_of_the_statefulset():
    workers = find("StatefulSet", "llmctl-worker")
    service = find("Service", workers["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    port = service["spec"]["ports"][0]["port"]
    args = container(find("Deployment", "llmctl-router"))["args"]
    urls = [args[i + 1] for i, a in enumerate(args) if a == "--worker-url"]
    name = workers["metadata"]["name"]
    assert urls == [f"http://{name}-{i}.{service['metadata']['name']}:{port}"
                    for i in range(workers["spec"]["replicas"])]


def test_container_arguments_parse_with_llmctls_own_options():
    router_args = container(find("Deployment", "llmctl-router"))["args"]
    result = CliRunner().invoke(app, [*router_args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--policy cache_aware" in result.output
    worker = container(find("StatefulSet", "llmctl-worker"))
    serve = load_command("serve")
    # Parsing only (no model is loaded): a flag serve does not know fails here.
    context = serve.make_context("serve", worker["args"][1:])
    assert context.params["port"] == worker["ports"][0]["containerPort"]


def test_probes_and_keys_point_at_what_exists():
    secret = find("Secret", "llmctl-api-key")
    for workload in (find("StatefulSet", "llmctl-worker"), find("Deployment", "llmctl-router")):
        c = container(workload)
        (env,) = c["env"]
        assert env["name"] == "LLMCTL_API_KEY"
        assert env["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c and "httpGet" in c[probe]:
                assert c[probe]["httpGet"]["port"] == c["ports"][0]["name"]
    worker = container(find("StatefulSet", "llmctl-worker"))
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health"
    grace = int(worker["args"][worker["args"].index("--grace-period") + 1])
    assert find("StatefulSet", "llmctl-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_router_and_expose_the_manifests_ports(name):
    text = (DEPLOY / name).read_text()
    assert re.search(r"^FROM \S+", text, re.MULTILINE)
    assert '".[cluster' in text  # the router comes with llmctl
    assert 'ENTRYPOINT ["llmctl"]' in text
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE) for p in line.split()}
    worker_port = container(find("StatefulSet", "llmctl-worker"))["ports"][0]["containerPort"]
    router_port = container(find("Deployment", "llmctl-router"))["ports"][0]["containerPort"]
    assert {worker_port, router_port} <= exposed
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1))
    assert load_command("serve").make_context("serve", cmd[1:]).params["host"] == "0.0.0.0"
