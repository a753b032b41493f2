"""The Helm chart (deploy/helm/weir): what it renders, with its defaults and with the options
turned, and that every manifest is valid against Kubernetes' own schemas
(``kubernetes-validate``, which carries them). Helm itself is in none of the registries this
project builds from, so ``helmlite`` renders the templates (see there)."""

import os

import kubernetes_validate
import pytest
import yaml

import weir
from conftest import ROOT
from helmlite import template

CHART = ROOT / "deploy" / "helm" / "weir"
KUBERNETES = "1.30"


def kinds(docs):
    return {d["kind"]: d for d in docs}


def container(docs):
    return kinds(docs)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]


def env(docs):
    return {e["name"]: e for e in container(docs)["env"]}


def test_the_defaults_make_a_statefulset_of_members_with_probes_a_budget_and_the_pipeline():
    docs = template(CHART, "fleet")
    k = kinds(docs)
    assert sorted(k) == ["ConfigMap", "PodDisruptionBudget", "Service", "StatefulSet"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # The pipeline goes in as written.
    assert k["ConfigMap"]["data"]["pipeline.yaml"].strip() == values["pipeline"].strip()
    sts = k["StatefulSet"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "fleet"
    c = container(docs)
    assert c["image"] == "registry.example.com/weir:0.1.0", "the tag defaults to the chart's appVersion"
    assert c["args"][:2] == ["run", "/etc/weir/pipeline.yaml"] and "0.0.0.0:9464" in c["args"]
    # The member name is the pod's name, and the bucket and its credentials come in by env.
    e = env(docs)
    assert e["HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "${HOSTNAME}" in values["pipeline"] and "member: ${HOSTNAME}" in values["pipeline"]
    assert e["CHECKPOINT_DIR"]["value"] == "s3://my-bucket/weir"
    assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "weir-s3", "key": "secret_access_key"}
    assert e["BROKERS"]["value"].startswith("kafka-0")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["limits"]["memory"] == "2Gi"
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["terminationGracePeriodSeconds"] == 60
    assert k["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert k["Service"]["spec"]["clusterIP"] == "None"
    # A changed pipeline changes the pod template, so the pods roll.
    other = template(CHART, "fleet", {"pipeline": values["pipeline"] + "# changed\n"})
    sha = lambda d: kinds(d)["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]["weir/pipeline-sha256"]
    assert sha(docs) != sha(other)


def test_options_add_a_service_monitor_and_drop_the_budget_and_the_key_secret():
    docs = template(CHART, "fleet", {
        "serviceMonitor": {"enabled": True, "interval": "30s"},
        "podDisruptionBudget": {"enabled": False},
        "checkpoints": {"secret": "", "endpoint": "http://minio:9000"},
        "image": {"tag": "1.2.3"},
        "nodeSelector": {"disk": "ssd"},
        "port": 9100,
    })
    k = kinds(docs)
    assert "PodDisruptionBudget" not in k
    assert k["ServiceMonitor"]["spec"]["endpoints"] == [{"port": "api", "path": "/metrics", "interval": "30s"}]
    e = env(docs)
    assert "AWS_ACCESS_KEY_ID" not in e and e["AWS_ENDPOINT"]["value"] == "http://minio:9000"
    c = container(docs)
    assert c["image"].endswith(":1.2.3") and "0.0.0.0:9100" in c["args"]
    assert c["ports"][0]["containerPort"] == 9100
    assert k["StatefulSet"]["spec"]["template"]["spec"]["nodeSelector"] == {"disk": "ssd"}


@pytest.mark.parametrize("overrides", [{}, {"serviceMonitor": {"enabled": True}, "checkpoints": {"secret": ""}}])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(overrides):
    for doc in template(CHART, "fleet", overrides):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A Prometheus Operator resource: its schema comes with the operator, not Kubernetes.
            assert doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "fleet"
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_charts_pipeline_is_a_valid_weir_pipeline(tmp_path, monkeypatch):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    path = tmp_path / "pipeline.yaml"
    path.write_text(values["pipeline"])
    for name, value in [("BROKERS", "127.0.0.1:9092"), ("HOSTNAME", "weir-0"), ("CHECKPOINT_DIR", str(tmp_path / "ck"))]:
        monkeypatch.setenv(name, value)
    weir.Pipeline.from_yaml(path).validate()
