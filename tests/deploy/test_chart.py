"""The Helm chart, rendered by Helm's engine for the default values and every file of chart/ci/,
checked against the Kubernetes schemas, the custom resources' schemas and what the services read."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

import contract
from contract.broker_roles import ROLES, TOPIC_EXCHANGE
from harness.chart_render import (
    CASES,
    CHART,
    HELPER_VARIABLES,
    OPERATOR_APIS,
    ROOT,
    SETTINGS,
    case_values,
    chart,
    container,
    containers,
    env,
    named,
    notes,
    of_kind,
    pod_spec,
    render,
    render_case,
)
from harness.stack import free_port
from sender import admin

KUBE_VERSIONS = ["1.29.0", "1.33.0"]
CRD_SCHEMAS = {
    (doc["apiVersion"], doc["kind"]): doc["openAPIV3Schema"]
    for doc in (
        yaml.safe_load(path.read_text()) for path in (Path(__file__).parent / "crd_schemas").glob("*.yaml")
    )
}
OUR_IMAGES = re.compile(r"^llm-dispatcher-(sender|consumer|simulator):")
# The metadata keys of KEDA's rabbitmq scaler (pkg/scalers/rabbitmq_scaler.go, v2.20.2: its
# `keda:"name=..., order=triggerMetadata"` fields); the CRD itself only says "a map of strings".
RABBITMQ_TRIGGER_KEYS = {
    "queueName", "mode", "queueLength", "value", "activationValue", "host", "protocol", "vhostName",
    "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
}  # fmt: skip
RECOMMENDED_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"]


def crd_validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    """Validate as the API server would: x-kubernetes-int-or-string admits both types."""
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case: str) -> None:
    report = helm_python.lint(CHART, case_values(case) or None, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_lint_reports_problems() -> None:
    report = helm_python.lint(CHART, {"models": [{"name": "x"}]}, strict=True)
    assert any(m["severity"] == 3 for m in report["messages"]), report


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_match_their_schemas(case: str, kube_version: str) -> None:
    objects = render_case(case)
    assert objects
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SCHEMAS:
            crd_validator(CRD_SCHEMAS[key]).validate(obj)
        else:
            kubernetes_validate.validate(obj, kube_version, strict=True)


def test_schemas_catch_mistakes() -> None:
    """The validation above would notice a misspelt field, built-in or custom."""
    objects = render_case("three-models-keda-values")
    deployment = copy.deepcopy(of_kind(objects, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(of_kind(objects, "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]).validate(scaled)


@pytest.mark.parametrize("case", CASES)
def test_names_and_labels(case: str) -> None:
    seen = set()
    for obj in render_case(case):
        name = obj["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert (obj["kind"], name) not in seen
        seen.add((obj["kind"], name))
        labels = obj["metadata"].get("labels", {})
        assert all(label in labels for label in RECOMMENDED_LABELS), (obj["kind"], name, labels)


@pytest.mark.parametrize("case", CASES)
def test_pods_are_locked_down(case: str) -> None:
    for obj in render_case(case):
        spec = pod_spec(obj)
        if spec is None:
            continue
        assert spec.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
        pod_context = spec.get("securityContext", {})
        for c in containers(spec):
            context = {**pod_context, **c.get("securityContext", {})}
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert context.get("runAsNonRoot") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            if OUR_IMAGES.match(c["image"]):
                assert context.get("readOnlyRootFilesystem") is True, where


def broker_is_internal(values: dict[str, Any]) -> bool:
    """What the chart decides: ``rabbitmq.internal`` if given, else whether no ``urlSecret`` is."""
    rabbitmq = values.get("rabbitmq", {})
    internal = rabbitmq.get("internal")
    return not rabbitmq.get("urlSecret") if internal is None else bool(internal)


def generated_secrets(values: dict[str, Any]) -> list[str]:
    """The Secrets the chart itself makes (random, kept across upgrades): nothing a value holds."""
    names = []
    if values.get("database", {}).get("internal"):
        names.append("rel-llm-dispatcher-database")
    if broker_is_internal(values):
        roles = ["sender", "consumer", *(["autoscaler"] if values.get("keda", {}).get("enabled") else [])]
        names += [f"rel-llm-dispatcher-rabbitmq-user-{role}" for role in roles]
    vllm_models = [m for m in values.get("models", []) if m.get("backend", "vllm") == "vllm"]
    if vllm_models and not values.get("vllm", {}).get("apiKey", {}).get("existingSecret"):
        names.append("rel-llm-dispatcher-vllm-api-key")
    pepper = values.get("tokenPepper", {})
    if pepper.get("generate", True) and not pepper.get("secretName"):
        names.append("rel-llm-dispatcher-token-pepper")
    return sorted(names)


@pytest.mark.parametrize("case", CASES)
def test_secrets_only_by_reference(case: str) -> None:
    """No credential in a manifest: the only Secrets rendered are the generated ones."""
    objects = render_case(case)
    secrets = of_kind(objects, "Secret")
    assert sorted(s["metadata"]["name"] for s in secrets) == generated_secrets(case_values(case))
    for obj in objects:
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            for name, value in env(c).items():
                if name in {
                    "RABBITMQ_URL",
                    "DATABASE_URL",
                    "HF_TOKEN",
                    "RABBITMQ_PASSWORD",
                    "VLLM_API_KEY",
                    "CONSUMER_VLLM_API_KEY",
                }:
                    assert isinstance(value, dict) or "$(RABBITMQ_PASSWORD)" in value, (name, value)


@pytest.mark.parametrize("case", CASES)
def test_environment_names_are_settings(case: str) -> None:
    """The chart sets only variables our services read (a misspelt name would be ignored silently)."""
    roles = {"sender": "sender", "consumer": "consumer", "simulator": "simulator"}
    for obj in render_case(case):
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            match = OUR_IMAGES.match(c["image"])
            if not match:
                continue
            role = roles.get(c["name"], match.group(1))
            unknown = set(env(c)) - SETTINGS[role] - HELPER_VARIABLES
            assert not unknown, (obj["metadata"]["name"], c["name"], unknown)


def test_sender() -> None:
    objects = render_case("one-model-values")
    deployment = named(objects, "Deployment", "-sender")
    sender = container(deployment, "sender")
    assert sender["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert sender["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert sender["resources"]["requests"]
    variables = env(sender)
    assert variables["SENDER_HOST"] == "0.0.0.0"
    assert variables["RABBITMQ_URL"]["secretKeyRef"] == {"name": "dispatcher-broker", "key": "url"}
    assert variables["DATABASE_URL"]["secretKeyRef"] == {"name": "dispatcher-db", "key": "url"}
    assert "replicas" not in deployment["spec"]  # the HPA decides
    hpa = named(objects, "HorizontalPodAutoscaler", "-sender")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    pdb = named(objects, "PodDisruptionBudget", "-sender")
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    service = named(objects, "Service", "-sender")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    ("sender", "grace", "pre_stop", "termination"),
    [
        ({}, "60", 5, 75),
        ({"shutdownGraceSeconds": 600, "preStopSeconds": 12}, "600", 12, 622),
        ({"shutdownGraceSeconds": 1, "preStopSeconds": 0}, "1", None, 11),
    ],
)
def test_sender_drains_on_rollouts(
    sender: dict[str, Any], grace: str, pre_stop: int | None, termination: int
) -> None:
    """Out of the Service's endpoints first (the preStop pause), then requests in flight get their grace."""
    deployment = named(render({"sender": sender}), "Deployment", "-sender")
    container_ = container(deployment, "sender")
    assert env(container_)["SENDER_SHUTDOWN_GRACE"] == grace
    if pre_stop is None:
        assert "lifecycle" not in container_
    else:
        command = ["python", "-c", f"import time; time.sleep({pre_stop})"]
        assert container_["lifecycle"]["preStop"]["exec"]["command"] == command
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == termination


def test_ingress_streams_and_hides_internal_routes() -> None:
    ingress = named(render_case("one-model-values"), "Ingress", "-sender")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 600
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-example-tls"}]
    paths = {p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/v1", "/tokenize", "/detokenize"}  # never /metrics or /health


def test_model_pod_runs_vllm_and_the_consumer_beside_it() -> None:
    objects = render_case("one-model-values")
    deployment = named(objects, "Deployment", "-model-llama-3-1-8b")
    assert deployment["spec"]["replicas"] == 2
    vllm = container(deployment, "vllm")
    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = vllm["args"]

    def arg(flag: str) -> str:
        return str(args[args.index(flag) + 1])

    assert arg("--model") == "meta-llama/Llama-3.1-8B-Instruct"
    assert arg("--served-model-name") == "llama-3.1-8b"
    assert arg("--dtype") == "bfloat16"
    assert arg("--max-model-len") == "16384"
    assert arg("--gpu-memory-utilization") == "0.92"
    assert arg("--scheduling-policy") == "priority"
    assert "--quantization" not in args
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = vllm["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # big models load slowly
    assert env(vllm)["HF_TOKEN"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    # vLLM on the pod's loopback, with an API key from a Secret; nothing else listens for it.
    assert arg("--host") == "127.0.0.1"
    assert "--api-key" not in args  # from the environment, not in the process's arguments
    assert "ports" not in vllm
    key = {"name": "rel-llm-dispatcher-vllm-api-key", "key": "api-key"}
    assert env(vllm)["VLLM_API_KEY"]["secretKeyRef"] == key
    secret = named(objects, "Secret", "-vllm-api-key")
    assert len(secret["stringData"]["api-key"]) == 48
    # The kubelet cannot reach a loopback address: the probes run in the container, on loopback.
    port = args[args.index("--port") + 1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = vllm[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"], probe
        assert f"http://127.0.0.1:{port}/health" in command[2], probe

    consumer = container(deployment, "consumer")
    variables = env(consumer)
    assert variables["MODEL"] == "llama-3.1-8b"
    assert variables["VLLM_URL"] == f"http://127.0.0.1:{port}"
    assert variables["CONSUMER_VLLM_API_KEY"]["secretKeyRef"] == key
    assert variables["CONSUMER_FORWARD_PRIORITY"] == "true"
    # The consumer's readiness follows vLLM's (it is ready only while it consumes).
    assert consumer["readinessProbe"]["httpGet"] == {"path": "/health", "port": "status"}
    status = next(p["containerPort"] for p in consumer["ports"] if p["name"] == "status")
    assert variables["CONSUMER_STATUS_PORT"] == str(status)
    # vLLM outlives the consumer's drain on shutdown: its preStop waits for the consumer's status port
    # to close (the consumer's last step), bounded; the pod's grace covers both.
    assert variables["CONSUMER_SHUTDOWN_GRACE"] == "600"  # the request deadline, SENDER_DEADLINE_SECONDS
    pre_stop = vllm["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["python3", "-c"]
    assert f"('127.0.0.1', {status})" in pre_stop[2] and "time.monotonic() + 610" in pre_stop[2]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 630
    spec = deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = named(objects, "PersistentVolumeClaim", "-model-llama-3-1-8b-cache")
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"


def test_three_models() -> None:
    objects = render_case("three-models-keda-values")
    models = case_values("three-models-keda-values")["models"]
    deployments = [d for d in of_kind(objects, "Deployment") if "-model-" in d["metadata"]["name"]]
    assert sorted(env(container(d, "consumer"))["MODEL"] for d in deployments) == sorted(
        m["name"] for m in models
    )
    big = named(objects, "Deployment", "-model-llama-3-3-70b-awq")
    args = container(big, "vllm")["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--quantization") + 1] == "awq"
    assert args[-3:] == ["--enable-prefix-caching", "--max-num-seqs", "128"]
    assert container(big, "vllm")["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env(container(big, "vllm"))["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert big["spec"]["template"]["spec"]["tolerations"] == models[1]["tolerations"]
    embed = named(objects, "Deployment", "-model-bge-m3")
    assert env(container(embed, "consumer"))["CONSUMER_MAX_INFLIGHT"] == "256"
    for deployment in deployments:
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "shared-model-cache"
    assert not of_kind(objects, "PersistentVolumeClaim")


def test_priority_forwarding_can_be_off() -> None:
    values = case_values("one-model-values")
    values["vllm"]["forwardPriority"] = False
    deployment = named(render(values), "Deployment", "-model-llama-3-1-8b")
    assert "--scheduling-policy" not in container(deployment, "vllm")["args"]
    assert env(container(deployment, "consumer"))["CONSUMER_FORWARD_PRIORITY"] == "false"


def test_keda_scales_each_model_on_its_queue() -> None:
    objects = render_case("three-models-keda-values")
    scaled = of_kind(objects, "ScaledObject")
    models = case_values("three-models-keda-values")["models"]
    assert len(scaled) == len(models)
    auth = named(objects, "TriggerAuthentication", "-rabbitmq-queue-reader")
    for model in models:
        obj = next(
            s
            for s in scaled
            if s["metadata"]["labels"]["llm-dispatcher/model"] in model["name"].replace(".", "-")
        )
        deployment = named(objects, "Deployment", obj["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in deployment["spec"]  # KEDA owns it
        assert env(container(deployment, "consumer"))["MODEL"] == model["name"]
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["queueName"] == contract.model_queue(model["name"])
        assert trigger["metadata"]["mode"] == "QueueLength"
        # Requests waiting and being served (the management API's `messages`), not only waiting ones.
        assert trigger["metadata"]["protocol"] == "http"
        assert trigger["metadata"]["host"] == "http://rel-llm-dispatcher-rabbitmq.llm.svc:15672/"
        assert trigger["metadata"]["activationValue"] == "0"  # the first request wakes it
        assert set(trigger["metadata"]) <= RABBITMQ_TRIGGER_KEYS
        assert obj["spec"]["initialCooldownPeriod"] == 1800  # the startup probe's budget
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        overrides = model.get("keda", {})
        assert obj["spec"]["minReplicaCount"] == overrides.get("minReplicaCount", 1)
        assert obj["spec"]["maxReplicaCount"] == overrides.get("maxReplicaCount", 3)
        assert trigger["metadata"]["value"] == str(overrides.get("queueLength", 32))
    # Scaled to zero, a model is woken by the requests queued for it: the sender knows the models,
    # declares their queues and queues their requests while they have no replica.
    sender = container(named(objects, "Deployment", "-sender"), "sender")
    assert env(sender)["SENDER_MODELS"].split(",") == [model["name"] for model in models]
    assert env(sender)["SENDER_COLD_START_SECONDS"] == "0"
    secrets = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert secrets["password"]["name"] == "rel-llm-dispatcher-rabbitmq-user-autoscaler"
    assert secrets["username"]["name"] == "rel-llm-dispatcher-rabbitmq-user-autoscaler"


def test_keda_with_an_external_broker_reads_its_url_secret() -> None:
    values = {**case_values("one-model-values"), "keda": {"enabled": True}}
    # protocol http needs the management API's URL: the sender's AMQP URL will not do.
    with pytest.raises(helm_python.HelmRenderError, match=r"needs rabbitmq\.kedaUrlSecretKey"):
        render(values)
    values["rabbitmq"] = {**values["rabbitmq"], "kedaUrlSecretKey": "keda-management-url"}
    objects = render(values)
    auth = named(objects, "TriggerAuthentication", "-rabbitmq-queue-reader")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "dispatcher-broker", "key": "keda-management-url"}
    ]
    metadata = of_kind(objects, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    assert "host" not in metadata and metadata["protocol"] == "http"
    # protocol amqp (a broker without the management plugin) still falls back to the sender's URL.
    values = {**case_values("one-model-values"), "keda": {"enabled": True, "protocol": "amqp"}}
    objects = render(values)
    auth = named(objects, "TriggerAuthentication", "-rabbitmq-queue-reader")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "dispatcher-broker", "key": "url"}
    ]
    assert of_kind(objects, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["protocol"] == "amqp"


def test_keda_amqp_protocol_with_the_internal_broker() -> None:
    values = case_values("three-models-keda-values")
    values["keda"]["protocol"] = "amqp"
    objects = render(values)
    trigger = of_kind(objects, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    assert trigger["host"] == "amqp://rel-llm-dispatcher-rabbitmq.llm.svc:5672/"
    assert "tags" not in named(objects, "User", "-rabbitmq-autoscaler")["spec"]
    policy = named(objects, "NetworkPolicy", "-rabbitmq")["spec"]["ingress"]
    keda = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}
    assert [keda in rule["from"] for rule in policy[:2]] == [True, False]  # AMQP, not management


def test_keda_reads_the_management_port_of_the_internal_broker() -> None:
    objects = render_case("three-models-keda-values")
    rules = named(objects, "NetworkPolicy", "-rabbitmq")["spec"]["ingress"]
    keda = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}
    readers = [rule for rule in rules if keda in rule["from"]]
    assert [rule["ports"] for rule in readers] == [[{"port": 15672, "protocol": "TCP"}]]


def test_initial_cooldown_follows_the_startup_probe_or_a_value() -> None:
    values = case_values("three-models-keda-values")
    values["vllm"]["startupProbe"] = {"periodSeconds": 5, "failureThreshold": 60}
    values["models"][2]["keda"] = {"initialCooldownPeriod": 120}
    scaled = {s["metadata"]["name"]: s["spec"] for s in of_kind(render(values), "ScaledObject")}
    assert scaled["rel-llm-dispatcher-model-qwen2-5-7b"]["initialCooldownPeriod"] == 300
    assert scaled["rel-llm-dispatcher-model-bge-m3"]["initialCooldownPeriod"] == 120
    values["keda"]["initialCooldownPeriod"] = 0
    scaled = {s["metadata"]["name"]: s["spec"] for s in of_kind(render(values), "ScaledObject")}
    assert scaled["rel-llm-dispatcher-model-qwen2-5-7b"]["initialCooldownPeriod"] == 0


@pytest.mark.parametrize(
    ("values", "grace"),
    [
        ({}, 600),
        ({"sender": {"env": {"SENDER_DEADLINE_SECONDS": "1800"}}}, 1800),
        (
            {"sender": {"env": {"SENDER_DEADLINE_SECONDS": 900}}, "consumer": {"shutdownGraceSeconds": 120}},
            120,
        ),
    ],
)
def test_consumer_drain_follows_the_request_deadline(values: dict[str, Any], grace: int) -> None:
    """Scale-in never cuts a request short: the consumer drains as long as a request may run."""
    values = {
        **values,
        "models": [{"name": "m", "model": "x"}, {"name": "s", "model": "x", "backend": "simulator"}],
    }
    objects = render(values)
    for name, backend in (("m", "vllm"), ("s", "simulator")):
        deployment = named(objects, "Deployment", f"-model-{name}")
        assert env(container(deployment, "consumer"))["CONSUMER_SHUTDOWN_GRACE"] == str(grace)
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace + 30
        pre_stop = container(deployment, backend)["lifecycle"]["preStop"]["exec"]["command"]
        assert f"time.monotonic() + {grace + 10}" in pre_stop[2]


def test_the_backend_outlives_the_consumer_on_shutdown() -> None:
    """The rendered preStop, run for real: it holds while the consumer's status port is open and
    returns as soon as it closes (the consumer's last step after its drain)."""
    port = free_port()
    values = {
        "consumer": {"statusPort": port, "shutdownGraceSeconds": 60},
        "models": [{"name": "m", "model": "x"}],
    }
    pre_stop = container(named(render(values), "Deployment", "-model-m"), "vllm")["lifecycle"]["preStop"]
    command = [sys.executable, *pre_stop["exec"]["command"][1:]]
    # No consumer listening (it has already exited, or never started): no wait.
    started = time.monotonic()
    subprocess.run(command, check=True, timeout=10)
    assert time.monotonic() - started < 3
    with socket.create_server(("127.0.0.1", port)) as consumer:
        consumer.settimeout(0.1)
        hook = subprocess.Popen(command)
        try:
            held_until = time.monotonic() + 3
            while time.monotonic() < held_until:  # the consumer drains: accept and drop its checks
                with contextlib.suppress(TimeoutError):
                    consumer.accept()[0].close()
                assert hook.poll() is None, "the backend stopped before the consumer"
        finally:
            consumer.close()
        closed = time.monotonic()
        assert hook.wait(timeout=10) == 0
        assert time.monotonic() - closed < 3


def test_the_model_cache_is_persistent_by_default() -> None:
    objects = render({"models": [{"name": "m", "model": "x"}]})
    claim = named(objects, "PersistentVolumeClaim", "-model-m-cache")
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "storageClassName" not in claim["spec"]
    volumes = {v["name"]: v for v in pod_spec(named(objects, "Deployment", "-model-m"))["volumes"]}  # type: ignore[index]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    sized = render(
        {
            "models": [{"name": "m", "model": "x"}],
            "vllm": {"cache": {"size": "300Gi", "storageClass": "fast"}},
        }
    )
    claim = named(sized, "PersistentVolumeClaim", "-model-m-cache")
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "300Gi"
    scratch = render({"models": [{"name": "m", "model": "x"}], "vllm": {"cache": {"persistence": False}}})
    assert not of_kind(scratch, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_spec(named(scratch, "Deployment", "-model-m"))["volumes"]}  # type: ignore[index]
    assert volumes["models"] == {"name": "models", "emptyDir": {}}


def test_internal_rabbitmq() -> None:
    objects = render_case("three-models-keda-values")
    (cluster,) = of_kind(objects, "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    config = cluster["spec"]["rabbitmq"]["additionalConfig"]
    settings = [
        line
        for line in (ROOT / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert settings and all(line in config.splitlines() for line in settings)
    assert "consumer_timeout = 7200000" in config.splitlines()
    assert "log.console.level = warning" in config.splitlines()
    host = f"{cluster['metadata']['name']}.llm.svc"
    for deployment in of_kind(objects, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            if c["name"] in {"sender", "consumer"}:
                variables = env(c)
                assert (
                    variables["RABBITMQ_URL"]
                    == f"amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{host}:5672/"
                )
                for part in ("USERNAME", "PASSWORD"):  # each role its own user, never the administrator
                    assert variables[f"RABBITMQ_{part}"]["secretKeyRef"]["name"] == (
                        f"{cluster['metadata']['name']}-user-{c['name']}"
                    )
    definitions = named(objects, "ConfigMap", "-rabbitmq-definitions")
    expected = json.loads((ROOT / "rabbitmq" / "definitions.json").read_text())
    assert json.loads(definitions["data"]["definitions.json"]) == expected
    dead_letter = next(p for p in expected["policies"] if p["name"] == "dispatch-dead-letter")
    assert dead_letter["definition"]["message-ttl"] == 600_000  # prompts kept 10 minutes, no more
    (job,) = [j for j in of_kind(objects, "Job") if "-rabbitmq-definitions-" in j["metadata"]["name"]]
    command = container(job, "import-definitions")["command"]
    assert command[-1] == f"http://{host}:15672/api/definitions"
    assert "@/definitions/definitions.json" in command


PINNED_RABBITMQ = re.compile(r"^rabbitmq:4\.3\.\d+-management$")


def test_default_install_creates_a_replicated_4_3_broker() -> None:
    """No broker values, the operators installed: 3 nodes on a pinned 4.3 image, model queues chosen
    by the services (quorum on 4.3), KEDA reading the management API of that broker."""
    values: dict[str, Any] = {"models": [{"name": "m", "model": "x"}], "keda": {"enabled": True}}
    objects = render(values)
    (cluster,) = of_kind(objects, "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    assert PINNED_RABBITMQ.match(cluster["spec"]["image"]), cluster["spec"]["image"]
    config = cluster["spec"]["rabbitmq"]["additionalConfig"].splitlines()
    assert [line for line in config if line.startswith("consumer_timeout")] == ["consumer_timeout = 7200000"]
    assert {u["metadata"]["name"] for u in of_kind(objects, "User")} == {
        f"rel-llm-dispatcher-rabbitmq-{role}" for role in ("sender", "consumer", "autoscaler")
    }
    host = "rel-llm-dispatcher-rabbitmq.llm.svc"
    for name, role in (("-sender", "sender"), ("-model-m", "consumer")):
        variables = env(container(named(objects, "Deployment", name), role))
        assert variables[f"{role.upper()}_QUEUE_TYPE"] == "auto"
        assert variables["RABBITMQ_URL"] == f"amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{host}:5672/"
    (trigger,) = of_kind(objects, "ScaledObject")[0]["spec"]["triggers"]
    assert trigger["metadata"]["host"] == f"http://{host}:15672/"
    secrets = named(objects, "TriggerAuthentication", "-rabbitmq-queue-reader")["spec"]["secretTargetRef"]
    assert {ref["name"] for ref in secrets} == {"rel-llm-dispatcher-rabbitmq-user-autoscaler"}
    assert "monitoring" in named(objects, "User", "-rabbitmq-autoscaler")["spec"]["tags"]
    # Broker nodes on separate machines when the scheduler can.
    (preferred,) = cluster["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": cluster["metadata"]["name"]}
    hard = of_kind(render({"rabbitmq": {"cluster": {"antiAffinity": "hard"}}}), "RabbitmqCluster")[0]
    assert hard["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        term
    ]
    none = of_kind(render({"rabbitmq": {"cluster": {"antiAffinity": "none"}}}), "RabbitmqCluster")[0]
    assert "affinity" not in none["spec"]
    for obj in objects:
        if obj["kind"] == "RabbitmqCluster":
            crd_validator(CRD_SCHEMAS[("rabbitmq.com/v1beta1", "RabbitmqCluster")]).validate(obj)


def test_no_operator_and_no_broker_fails_clearly() -> None:
    """Where the chart cannot create the broker, installing stops before anything is applied."""
    with pytest.raises(helm_python.HelmRenderError) as raised:
        render({}, api_versions=())
    message = str(raised.value)
    assert "rabbitmq.urlSecret" in message and "rabbitmq.internal=true" in message
    assert "RabbitmqCluster (the RabbitMQ cluster operator)" in message
    assert "User (the RabbitMQ messaging-topology-operator)" in message
    # Only the topology operator missing: the users could not be made.
    with pytest.raises(helm_python.HelmRenderError, match=r"lacks the API of rabbitmq\.com/v1beta1/User "):
        render({}, api_versions=("rabbitmq.com/v1beta1/RabbitmqCluster",))
    # internal: true asks for it anyway (helm template offline, operators installed in the same sync).
    assert of_kind(render({"rabbitmq": {"internal": True}}, api_versions=()), "RabbitmqCluster")


def test_an_external_broker_is_one_value_away() -> None:
    values: dict[str, Any] = {"models": [{"name": "m", "model": "x"}], "rabbitmq": {"urlSecret": "my-broker"}}
    for api_versions in ((), OPERATOR_APIS):  # with or without the operators
        objects = render(values, api_versions=api_versions)
        assert not [o for o in objects if o["apiVersion"].startswith("rabbitmq.com/")]
        assert not [
            o for o in objects if "rabbitmq" in o["metadata"]["name"] and o["kind"] != "NetworkPolicy"
        ]
        for name, role in (("-sender", "sender"), ("-model-m", "consumer")):
            variables = env(container(named(objects, "Deployment", name), role))
            assert variables["RABBITMQ_URL"] == {"secretKeyRef": {"name": "my-broker", "key": "url"}}
            assert variables[f"{role.upper()}_QUEUE_TYPE"] == "auto"
    # internal: false without a Secret is refused by the schema.
    with pytest.raises(helm_python.HelmValuesError, match="/rabbitmq/urlSecret"):
        render({"rabbitmq": {"internal": False}})


def test_queue_type_is_one_value_for_sender_and_consumers() -> None:
    objects = render({"models": [{"name": "m", "model": "x"}], "rabbitmq": {"queueType": "classic"}})
    assert env(container(named(objects, "Deployment", "-sender"), "sender"))["SENDER_QUEUE_TYPE"] == "classic"
    assert (
        env(container(named(objects, "Deployment", "-model-m"), "consumer"))["CONSUMER_QUEUE_TYPE"]
        == "classic"
    )
    with pytest.raises(helm_python.HelmRenderError, match=r"rabbitmq\.queueType"):
        render({"models": [{"name": "m", "model": "x", "consumerEnv": {"CONSUMER_QUEUE_TYPE": "quorum"}}]})
    with pytest.raises(helm_python.HelmRenderError, match=r"rabbitmq\.queueType"):
        render({"sender": {"env": {"SENDER_QUEUE_TYPE": "quorum"}}})


def test_consumer_timeout_outlasts_the_longest_generation() -> None:
    """Quorum queues (4.3) take back a request held past consumer_timeout: it must exceed the deadline."""
    with pytest.raises(helm_python.HelmRenderError, match=r"consumerTimeoutSeconds \(7200\) must exceed"):
        render({"sender": {"env": {"SENDER_DEADLINE_SECONDS": "7200"}}})
    values: dict[str, Any] = {"sender": {"env": {"SENDER_DEADLINE_SECONDS": 7200}}}
    values["rabbitmq"] = {"consumerTimeoutSeconds": 10800}
    (cluster,) = of_kind(render(values), "RabbitmqCluster")
    assert "consumer_timeout = 10800000" in cluster["spec"]["rabbitmq"]["additionalConfig"].splitlines()
    with pytest.raises(helm_python.HelmRenderError, match=r"set rabbitmq\.consumerTimeoutSeconds instead"):
        render({"rabbitmq": {"cluster": {"additionalConfig": "consumer_timeout = 60000"}}})
    # An external broker's timeout is its operator's to set (rabbitmq/README.md): no check then.
    assert render({"rabbitmq": {"urlSecret": "b"}, "sender": {"env": {"SENDER_DEADLINE_SECONDS": 9000}}})


def test_additional_config_replaces_the_same_keys() -> None:
    values = {
        "rabbitmq": {
            "cluster": {"additionalConfig": "disk_free_limit.absolute = 5GB\nlog.console.level = warning"}
        }
    }
    (cluster,) = of_kind(render(values), "RabbitmqCluster")
    config = cluster["spec"]["rabbitmq"]["additionalConfig"].splitlines()
    assert [line for line in config if line.startswith("disk_free_limit")] == [
        "disk_free_limit.absolute = 5GB"
    ]
    assert "vm_memory_high_watermark.relative = 0.6" in config and "log.console.level = warning" in config


def test_each_role_has_its_own_broker_user() -> None:
    """The internal broker's users carry exactly the permissions tests/security proves on a real broker."""
    objects = render_case("three-models-keda-values")
    cluster = of_kind(objects, "RabbitmqCluster")[0]["metadata"]["name"]
    users = {
        u["metadata"]["name"].removeprefix("rel-llm-dispatcher-rabbitmq-"): u
        for u in of_kind(objects, "User")
    }
    assert set(users) == set(ROLES)
    for role, permissions in ROLES.items():
        user = users[role]
        assert user["spec"]["rabbitmqClusterReference"] == {"name": cluster}
        # Only the autoscaler has a tag: monitoring, to read queue counts from the management API.
        assert user["spec"].get("tags", []) == list(permissions.tags)
        secret = named(objects, "Secret", f"-rabbitmq-user-{role}")
        assert user["spec"]["importCredentialsSecret"] == {"name": secret["metadata"]["name"]}
        assert secret["stringData"]["username"] == f"dispatch-{role}"
        assert len(secret["stringData"]["password"]) == 32
        permission = named(objects, "Permission", f"-rabbitmq-{role}")["spec"]
        assert permission["userReference"] == {"name": user["metadata"]["name"]}
        assert permission["vhost"] == "/"
        assert permission["permissions"] == {
            "configure": permissions.configure,
            "write": permissions.write,
            "read": permissions.read,
        }
        topics = [
            t["spec"] for t in of_kind(objects, "TopicPermission") if t["metadata"]["name"].endswith(role)
        ]
        if role == "autoscaler":
            assert not topics  # it may write and read nothing at all
        else:
            assert topics[0]["userReference"] == {"name": user["metadata"]["name"]}
            assert topics[0]["permissions"] == {
                "exchange": TOPIC_EXCHANGE,
                "write": permissions.topic_write,
                "read": permissions.topic_read,
            }
    # Without KEDA there is no autoscaler user.
    plain = render(case_values("internal-trial-values"))
    assert {u["metadata"]["name"] for u in of_kind(plain, "User")} == {
        "rel-llm-dispatcher-rabbitmq-sender",
        "rel-llm-dispatcher-rabbitmq-consumer",
    }


def test_external_broker_urls_per_role() -> None:
    values = case_values("one-model-values")
    values["rabbitmq"] |= {"consumerUrlSecretKey": "consumer-url", "kedaUrlSecretKey": "keda-url"}
    values["keda"] = {"enabled": True}
    objects = render(values)
    sender = env(container(named(objects, "Deployment", "-sender"), "sender"))
    consumer = env(container(named(objects, "Deployment", "-model-llama-3-1-8b"), "consumer"))
    assert sender["RABBITMQ_URL"]["secretKeyRef"] == {"name": "dispatcher-broker", "key": "url"}
    assert consumer["RABBITMQ_URL"]["secretKeyRef"] == {"name": "dispatcher-broker", "key": "consumer-url"}
    auth = named(objects, "TriggerAuthentication", "-rabbitmq-queue-reader")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "dispatcher-broker", "key": "keda-url"}
    ]


def test_broker_tls() -> None:
    values = case_values("three-models-keda-values")
    values["rabbitmq"] |= {"tls": {"enabled": True, "caSecret": "broker-ca"}}
    values["rabbitmq"]["cluster"]["tlsSecret"] = "broker-tls"
    objects = render(values)
    (cluster,) = of_kind(objects, "RabbitmqCluster")
    assert cluster["spec"]["tls"] == {"secretName": "broker-tls"}
    host = f"{cluster['metadata']['name']}.llm.svc"
    for name, role in (("-sender", "sender"), ("-model-bge-m3", "consumer")):
        deployment = named(objects, "Deployment", name)
        c = container(deployment, role)
        variables = env(c)
        assert variables["RABBITMQ_URL"] == f"amqps://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{host}:5671/"
        ca_file = variables[f"{role.upper()}_RABBITMQ_CA_FILE"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "rabbitmq-ca")
        assert ca_file == f"{mount['mountPath']}/ca.crt" and mount["readOnly"] is True
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["rabbitmq-ca"]["secret"]["secretName"] == "broker-ca"
    policy = named(objects, "NetworkPolicy", "-rabbitmq")["spec"]
    assert any({"port": 5671, "protocol": "TCP"} in rule["ports"] for rule in policy["ingress"])
    for case in CASES:  # and without TLS: plain amqp, no CA
        for obj in render_case(case):
            for c in containers(pod_spec(obj) or {"containers": []}):
                assert not any(name.endswith("_RABBITMQ_CA_FILE") for name in env(c)), obj["metadata"]["name"]


def test_vllm_api_key_from_an_existing_secret() -> None:
    values = case_values("one-model-values")
    values["vllm"]["apiKey"] = {"existingSecret": "my-vllm-key", "secretKey": "key"}
    objects = render(values)
    assert not [s for s in of_kind(objects, "Secret") if s["metadata"]["name"].endswith("-vllm-api-key")]
    deployment = named(objects, "Deployment", "-model-llama-3-1-8b")
    for name, variable in (("vllm", "VLLM_API_KEY"), ("consumer", "CONSUMER_VLLM_API_KEY")):
        assert env(container(deployment, name))[variable]["secretKeyRef"] == {
            "name": "my-vllm-key",
            "key": "key",
        }


def test_the_simulator_listens_on_loopback_too() -> None:
    deployment = named(render_case("internal-trial-values"), "Deployment", "-model-demo")
    simulator = container(deployment, "simulator")
    assert env(simulator)["SIMULATOR_HOST"] == "127.0.0.1"
    assert "ports" not in simulator
    assert simulator["readinessProbe"]["exec"]["command"][:2] == ["python", "-c"]
    assert "CONSUMER_VLLM_API_KEY" not in env(container(deployment, "consumer"))


def test_internal_database_and_db_init_job() -> None:
    objects = render_case("internal-trial-values")
    (database,) = of_kind(objects, "StatefulSet")
    secret = named(objects, "Secret", "-database")
    password = secret["stringData"]["password"]
    assert len(password) == 32
    assert secret["stringData"]["url"].startswith(f"postgresql+psycopg://dispatcher:{password}@")
    assert (
        env(container(database, "postgres"))["POSTGRES_PASSWORD"]["secretKeyRef"]["name"]
        == secret["metadata"]["name"]
    )
    (job,) = [j for j in of_kind(objects, "Job") if j["metadata"]["name"].endswith("-db-init")]
    # The database is part of the release, so the Job waits for the install.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


def db_init_steps(job: dict[str, Any]) -> list[list[str]]:
    return [c["command"] for c in job["spec"]["template"]["spec"]["initContainers"]]


def test_db_init_job_runs_the_admin_commands() -> None:
    objects = render_case("one-model-values")
    (job,) = [j for j in of_kind(objects, "Job") if j["metadata"]["name"].endswith("-db-init")]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    steps = db_init_steps(job)
    assert steps[0] == ["python", "-m", "sender.admin", "migrate"]
    tokens = case_values("one-model-values")["tokens"]
    assert len(steps) == 1 + len(tokens)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    for token, step, init in zip(
        tokens, steps[1:], job["spec"]["template"]["spec"]["initContainers"][1:], strict=True
    ):
        assert step[:4] == ["python", "-m", "sender.admin", "add-token"]
        options = dict(zip(step[4::2], step[5::2], strict=True))
        assert options == {
            "--name": token["name"],
            "--priority": str(token["priority"]),
            "--threshold": str(token["threshold"]),
            "--secret-file": options["--secret-file"],
        }
        (mount,) = init["volumeMounts"]
        assert options["--secret-file"] == f"{mount['mountPath']}/secret"
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == token["secretName"]
        assert secret["items"] == [{"key": token.get("secretKey", "token"), "path": "secret"}]
        assert init["image"].startswith("llm-dispatcher-sender:")
        assert env(init)["DATABASE_URL"]["secretKeyRef"]["name"] == "dispatcher-db"


def add_token_options(token: dict[str, Any]) -> dict[str, str]:
    """The options of the add-token step the db-init Job runs for a single ``token``."""
    (job,) = [
        j for j in of_kind(render({"tokens": [token]}), "Job") if j["metadata"]["name"].endswith("-db-init")
    ]
    step = db_init_steps(job)[1]
    assert step[:4] == ["python", "-m", "sender.admin", "add-token"]
    return dict(zip(step[4::2], step[5::2], strict=True))


def test_large_token_numbers_are_written_as_integers() -> None:
    """Helm reads YAML numbers as floats, whose default text is 1e+06: the admin CLI wants 1000000."""
    options = add_token_options({"name": "bulk", "priority": 0, "threshold": 1_000_000, "secretName": "s"})
    assert options["--threshold"] == "1000000"


def test_every_token_field_becomes_its_add_token_option() -> None:
    token = {
        "name": "bob",
        "priority": 2,
        "threshold": 50,
        "owner": "team b",
        "expires": "2027-01-01 00:00",
        "models": ["llama-3.1-8b", "mistral"],
        "rpm": 60,
        "tpm": 1_000_000,
        "maxSeconds": 7.5,
        "maxParallel": 8,
        "secretName": "bob-token",
        "secretKey": "secret",
    }
    options = add_token_options(token)
    assert options == {
        "--name": "bob",
        "--priority": "2",
        "--threshold": "50",
        "--owner": "team b",
        "--expires": "2027-01-01 00:00",
        "--models": "llama-3.1-8b,mistral",
        "--rpm": "60",
        "--tpm": "1000000",
        "--max-seconds": "7.5",
        "--max-parallel": "8",
        "--secret-file": "/tokens/0/secret",
    }
    args = [arg for option, value in options.items() for arg in (option, value)]
    parsed = admin.parser().parse_args(["add-token", *args])
    assert (parsed.models, parsed.rpm, parsed.tpm, parsed.max_seconds, parsed.max_parallel) == (
        ["llama-3.1-8b", "mistral"],
        60,
        1_000_000,
        7.5,
        8,
    )


def test_unset_token_fields_are_left_out() -> None:
    """So the admin CLI's defaults hold: no owner or expiry, every model, no limits, the server's deadline."""
    options = add_token_options({"name": "a", "priority": 0, "threshold": 5, "secretName": "s"})
    assert list(options) == ["--name", "--priority", "--threshold", "--secret-file"]


def test_network_policies_are_on_by_default() -> None:
    objects = render({"models": [{"name": "m", "model": "x"}]})
    names = {p["metadata"]["name"] for p in of_kind(objects, "NetworkPolicy")}
    assert names == {"rel-llm-dispatcher-sender", "rel-llm-dispatcher-models", "rel-llm-dispatcher-rabbitmq"}
    models = named(objects, "NetworkPolicy", "-models")["spec"]
    assert [port for rule in models["ingress"] for port in rule["ports"]] == [
        {"port": "status", "protocol": "TCP"}
    ]
    off = render({"models": [{"name": "m", "model": "x"}], "networkPolicy": {"enabled": False}})
    assert not of_kind(off, "NetworkPolicy")
    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "webui"}}}]
    more = render({"networkPolicy": {"senderClients": clients}})
    assert clients[0] in named(more, "NetworkPolicy", "-sender")["spec"]["ingress"][0]["from"]


def test_network_policies() -> None:
    objects = render_case("internal-trial-values")
    policies = {
        p["metadata"]["name"].removeprefix("rel-llm-dispatcher-"): p["spec"]
        for p in of_kind(objects, "NetworkPolicy")
    }
    assert set(policies) == {"sender", "models", "rabbitmq", "database"}
    labels = {
        component: named(objects, kind, f"-{name}")["spec"]["template"]["metadata"]["labels"]
        for component, kind, name in [
            ("sender", "Deployment", "sender"),
            ("model", "Deployment", "model-demo"),
        ]
    }

    def selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
        matched: bool = selector["matchLabels"].items() <= pod_labels.items()
        return matched

    # The sender: from the ingress controller's namespace (and Prometheus for /metrics), nothing else.
    assert selects(policies["sender"]["podSelector"], labels["sender"])
    sources = policies["sender"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in sources
    assert all("podSelector" not in source for source in sources)
    # Model pods: the vLLM port is open to nobody.
    assert selects(policies["models"]["podSelector"], labels["model"])
    open_ports = {port["port"] for rule in policies["models"].get("ingress", []) for port in rule["ports"]}
    assert "vllm" not in open_ports and 8000 not in open_ports
    # The management API: the definitions Job and the operators (which create the users).
    management = next(
        rule
        for rule in policies["rabbitmq"]["ingress"]
        if {"port": 15672, "protocol": "TCP"} in rule["ports"]
    )
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rabbitmq-system"}}} in (
        management["from"]
    )
    # The broker's AMQP port: the sender and the consumers only.
    amqp = next(
        rule for rule in policies["rabbitmq"]["ingress"] if {"port": 5672, "protocol": "TCP"} in rule["ports"]
    )
    allowed = [source["podSelector"] for source in amqp["from"]]
    assert len(allowed) == 2
    assert any(selects(s, labels["sender"]) for s in allowed) and any(
        selects(s, labels["model"]) for s in allowed
    )
    # The database: the sender and the db-init Job only.
    (rule,) = policies["database"]["ingress"]
    job = next(j for j in of_kind(objects, "Job") if j["metadata"]["name"].endswith("-db-init"))
    allowed = [source["podSelector"] for source in rule["from"]]
    assert any(selects(s, labels["sender"]) for s in allowed)
    assert any(selects(s, job["spec"]["template"]["metadata"]["labels"]) for s in allowed)
    assert not any(selects(s, labels["model"]) for s in allowed)


def test_monitoring_resources() -> None:
    objects = render_case("three-models-keda-values")
    monitors = {m["metadata"]["name"]: m for m in of_kind(objects, "ServiceMonitor")}
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors.values())
    models = monitors["rel-llm-dispatcher-models"]
    service = named(objects, "Service", "-models-metrics")
    assert models["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    sender = named(objects, "Service", "-sender-metrics")
    assert (
        monitors["rel-llm-dispatcher-sender"]["spec"]["selector"]["matchLabels"].items()
        <= sender["metadata"]["labels"].items()
    )
    assert {e["port"] for e in models["spec"]["endpoints"]} == {p["name"] for p in service["spec"]["ports"]}
    # vLLM's metrics through the consumer's status port: vLLM itself is on loopback.
    assert {(e["port"], e["path"]) for e in models["spec"]["endpoints"]} == {
        ("status", "/metrics"),
        ("status", "/backend-metrics"),
    }
    assert {e["port"] for e in monitors["rel-llm-dispatcher-rabbitmq"]["spec"]["endpoints"]} == {"prometheus"}
    (rule,) = of_kind(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "observability" / "prometheus-alerts.yaml").read_text())
    dashboard = named(objects, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert (
        dashboard["data"]["llm-dispatcher.json"]
        == (ROOT / "observability" / "grafana-dashboard.json").read_text()
    )


def test_sender_metrics_are_on_their_own_port_only_prometheus_reaches() -> None:
    """The metrics name tokens: never on the API port, the Service the ingress uses or the ingress."""
    objects = render_case("three-models-keda-values")
    deployment = named(objects, "Deployment", "-sender")
    sender = container(deployment, "sender")
    variables = env(sender)
    ports = {p["name"]: p["containerPort"] for p in sender["ports"]}
    assert ports == {"http": 8080, "metrics": 9100}
    assert variables["SENDER_METRICS_PORT"] == "9100" and variables["SENDER_METRICS_HOST"] == "0.0.0.0"
    # The API Service (the ingress's backend) has the API port only; a headless one the metrics port.
    api = named(objects, "Service", "-sender")
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"]
    metrics_service = named(objects, "Service", "-sender-metrics")
    assert metrics_service["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    monitor = next(m for m in of_kind(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-sender"))
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()
    for ingress in of_kind(render_case("one-model-values"), "Ingress"):
        backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
        assert all(b["name"] == api["metadata"]["name"] for b in backends), backends
    # Without the operator: the scrape annotations name the metrics port.
    annotations = named(render({}), "Deployment", "-sender")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"
    # The NetworkPolicy: the ingress namespace reaches http only, the monitoring namespace metrics only.
    policy = named(render_case("external-netpol-values"), "NetworkPolicy", "-sender")
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["spec"]["ingress"]}
    assert set(rules) == {("http",), ("metrics",)}
    assert all("ingress" not in json.dumps(source) for source in rules[("metrics",)])


def pepper_consumers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sender container and the db-init Job's add-token steps: whoever hashes a token."""
    job = next(j for j in of_kind(objects, "Job") if j["metadata"]["name"].endswith("-db-init"))
    steps = job["spec"]["template"]["spec"]["initContainers"][1:]
    assert steps
    return [container(named(objects, "Deployment", "-sender"), "sender"), *steps]


def test_the_chart_generates_the_token_pepper_by_default() -> None:
    objects = render(case_values("one-model-values"))
    secret = named(objects, "Secret", "-token-pepper")
    assert secret["metadata"]["name"] == "rel-llm-dispatcher-token-pepper"
    pepper = secret["stringData"]["pepper"]
    assert len(pepper) == 64 and pepper.isalnum()
    annotations = secret["metadata"]["annotations"]
    # there before the db-init Job (a pre-install hook too when the database is external) and the senders
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    job = next(j for j in of_kind(objects, "Job") if j["metadata"]["name"].endswith("-db-init"))
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    job_weight = job["metadata"]["annotations"]["helm.sh/hook-weight"]
    assert int(annotations["helm.sh/hook-weight"]) < int(job_weight)
    assert annotations["helm.sh/resource-policy"] == "keep"
    for consumer in pepper_consumers(objects):
        assert env(consumer)["SENDER_TOKEN_PEPPER"]["secretKeyRef"] == {
            "name": "rel-llm-dispatcher-token-pepper",
            "key": "pepper",
        }, consumer["name"]
    # a new random value at each render without a cluster to read it back from; the template keeps
    # the one it finds (lookup), as the vLLM key's does
    template = (CHART / "templates" / "token-pepper.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template


def test_the_token_pepper_from_an_operator_secret() -> None:
    values = {"tokenPepper": {"secretName": "dispatcher-pepper"}, **case_values("one-model-values")}
    objects = render(values)
    assert not [s for s in of_kind(objects, "Secret") if s["metadata"]["name"].endswith("-token-pepper")]
    for consumer in pepper_consumers(objects):
        assert env(consumer)["SENDER_TOKEN_PEPPER"]["secretKeyRef"] == {
            "name": "dispatcher-pepper",
            "key": "pepper",
        }, consumer["name"]


def test_the_token_pepper_can_be_turned_off() -> None:
    objects = render({"tokenPepper": {"generate": False}, **case_values("one-model-values")})
    assert not [s for s in of_kind(objects, "Secret") if s["metadata"]["name"].endswith("-token-pepper")]
    for consumer in pepper_consumers(objects):
        assert "SENDER_TOKEN_PEPPER" not in env(consumer), consumer["name"]


def test_chart_files_are_links_to_the_sources() -> None:
    """chart/files holds symbolic links (Helm's loader and `helm package` follow them): no copy to drift."""
    for link in (CHART / "files").iterdir():
        assert link.is_symlink(), link
        assert link.resolve().is_relative_to(ROOT) and link.resolve().exists(), link


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": [{"name": "no-model-id"}]}, "missing property 'model'"),
        ({"models": [{"name": "bad name", "model": "x"}]}, "/models/0/name"),
        ({"models": [{"name": "m", "model": "x", "gpus": 0}]}, "/models/0/gpus"),
        (
            {"models": [{"name": "m", "model": "x", "gpuMemoryUtilization": 1.5}]},
            "/models/0/gpuMemoryUtilization",
        ),
        ({"models": [{"name": "m", "model": "x", "backend": "tgi"}]}, "/models/0/backend"),
        ({"models": [{"name": "m", "model": "x", "maxModelLen": "8k"}]}, "/models/0/maxModelLen"),
        (
            {"models": [{"name": "m", "model": "x", "replica": 2}]},
            "additional properties 'replica' not allowed",
        ),
        (
            {"tokens": [{"name": "a", "priority": 12, "threshold": 5, "secretName": "s"}]},
            "/tokens/0/priority",
        ),
        (
            {"tokens": [{"name": "a", "priority": 1, "threshold": 5, "secret": "sk-plain"}]},
            "missing property 'secretName'",
        ),
        *(
            ({"tokens": [{"name": "a", "priority": 1, "threshold": 5, "secretName": "s", **field}]}, message)
            for field, message in cast(
                "list[tuple[dict[str, Any], str]]",
                [
                    ({"rpm": -1}, "/tokens/0/rpm"),
                    ({"rpm": 0}, "/tokens/0/rpm"),
                    ({"tpm": 1.5}, "/tokens/0/tpm"),
                    ({"tpm": 2**31}, "/tokens/0/tpm"),
                    ({"maxSeconds": 0}, "/tokens/0/maxSeconds"),
                    ({"maxSeconds": "60"}, "/tokens/0/maxSeconds"),
                    ({"maxParallel": 0}, "/tokens/0/maxParallel"),
                    ({"models": "llama,mistral"}, "/tokens/0/models"),
                    ({"models": []}, "/tokens/0/models"),
                    ({"models": ["bad name"]}, "/tokens/0/models/0"),
                    ({"owner": ""}, "/tokens/0/owner"),
                    ({"expires": "30d"}, "/tokens/0/expires"),
                    ({"expires": "next year"}, "/tokens/0/expires"),
                    ({"maxseconds": 60}, "additional properties 'maxseconds' not allowed"),
                ],
            )
        ),
        (
            {"tokens": [{"name": "a", "priority": -1, "threshold": 5, "secretName": "s"}]},
            "/tokens/0/priority",
        ),
        (
            {"tokens": [{"name": "a", "priority": 1, "threshold": 0, "secretName": "s"}]},
            "/tokens/0/threshold",
        ),
        ({"rabbitmq": {"internal": False, "urlSecret": ""}}, "/rabbitmq/urlSecret"),
        ({"rabbitmq": {"internal": "auto"}}, "/rabbitmq/internal"),
        ({"rabbitmq": {"queueType": "stream"}}, "/rabbitmq/queueType"),
        ({"rabbitmq": {"consumerTimeoutSeconds": 0}}, "/rabbitmq/consumerTimeoutSeconds"),
        ({"rabbitmq": {"cluster": {"image": "rabbitmq:4.3 management"}}}, "/rabbitmq/cluster/image"),
        ({"rabbitmq": {"cluster": {"antiAffinity": "strict"}}}, "/rabbitmq/cluster/antiAffinity"),
        ({"database": {"urlSecret": ""}}, "/database/urlSecret"),
        ({"rabbitmq": {"internal": True, "cluster": {"replicas": 2}}}, "/rabbitmq/cluster/replicas"),
        ({"keda": {"enabled": "yes"}}, "/keda/enabled"),
        ({"rabbitmq": {"deadLetterTTLSeconds": 0}}, "/rabbitmq/deadLetterTTLSeconds"),
        ({"rabbitmq": {"internal": True, "tls": {"enabled": True}}}, "/rabbitmq/cluster/tlsSecret"),
        ({"rabbitmq": {"tls": {"caSecret": "Bad_Name"}}}, "/rabbitmq/tls/caSecret"),
        ({"vllm": {"apiKey": {"secret": "k"}}}, "additional properties 'secret' not allowed"),
        ({"keda": {"minReplicaCount": -1}}, "/keda/minReplicaCount"),
        ({"keda": {"protocol": "grpc"}}, "/keda/protocol"),
        ({"keda": {"initialCooldownPeriod": -1}}, "/keda/initialCooldownPeriod"),
        ({"consumer": {"shutdownGraceSeconds": 0}}, "/consumer/shutdownGraceSeconds"),
        ({"sender": {"env": {"bad-name": "1"}}}, "/sender/env"),
        ({"sender": {"shutdownGraceSeconds": 0}}, "/sender/shutdownGraceSeconds"),
        ({"sender": {"shutdownGraceSeconds": "60"}}, "/sender/shutdownGraceSeconds"),
        ({"sender": {"shutdownGraceSeconds": 2.5}}, "/sender/shutdownGraceSeconds"),
        ({"sender": {"preStopSeconds": -1}}, "/sender/preStopSeconds"),
        ({"sender": {"preStopSeconds": "5s"}}, "/sender/preStopSeconds"),
        ({"ingress": {"enabled": True, "host": "Not A Host"}}, "/ingress/host"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"sender": {"resources": {"requests": {"cpu": "lots"}}}}, "/sender/resources/requests/cpu"),
        ({"unknownTopLevel": 1}, "additional properties 'unknownTopLevel' not allowed"),
    ],
)
def test_values_schema_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as raised:
        chart().validate_schema(values)
    assert message in str(raised.value)
    with pytest.raises(helm_python.HelmError):
        render(values)


def test_aliases_and_lora_adapters_are_served_listed_and_wake_the_model() -> None:
    models = [
        {
            "name": "llama",
            "model": "meta/llama",
            "aliases": ["llama-3-8b"],
            "loraModules": [{"name": "course-a", "path": "/models/adapters/a"}],
        },
        {
            "name": "sim",
            "model": "x",
            "backend": "simulator",
            "aliases": ["sim-b"],
            "loraModules": [{"name": "sim-lora", "path": "/a"}],
        },
    ]
    objects = render({"models": models, "keda": {"enabled": True}})
    args = container(named(objects, "Deployment", "-model-llama"), "vllm")["args"]
    at = args.index("--served-model-name")
    assert args[at + 1 : at + 3] == ["llama", "llama-3-8b"]
    assert "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == "course-a=/models/adapters/a"
    assert env(container(named(objects, "Deployment", "-model-llama"), "consumer"))["MODEL"] == "llama"
    simulator = env(container(named(objects, "Deployment", "-model-sim"), "simulator"))
    assert simulator["SIMULATOR_ALIASES"] == "sim-b" and simulator["SIMULATOR_LORA_MODULES"] == "sim-lora=/a"
    sender = container(named(objects, "Deployment", "-sender"), "sender")
    assert env(sender)["SENDER_MODELS"].split(",") == [
        "llama",
        "llama-3-8b",
        "course-a",
        "sim",
        "sim-b",
        "sim-lora",
    ]
    scaled = named(objects, "ScaledObject", "-model-llama")
    queues = [trigger["metadata"]["queueName"] for trigger in scaled["spec"]["triggers"]]
    assert queues == [contract.model_queue(name) for name in ("llama", "llama-3-8b", "course-a")]
    chart().validate_schema({"models": models})


@pytest.mark.parametrize("case", CASES)
def test_values_schema_accepts_the_examples(case: str) -> None:
    chart().validate_schema(case_values(case))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": [{"name": "a.b", "model": "x"}, {"name": "a_b", "model": "y"}]}, "same Kubernetes name"),
        (
            {
                "models": [
                    {"name": "a", "model": "x", "aliases": ["b"]},
                    {"name": "c", "model": "y", "aliases": ["b"]},
                ]
            },
            "the name b is served twice",
        ),
        (
            {"models": [{"name": "a", "model": "x", "loraModules": [{"name": "a", "path": "/p"}]}]},
            "the name a is served twice",
        ),
        ({"tokens": [{"name": "a", "priority": 1, "threshold": 5, "secretName": "s"}] * 2}, "listed twice"),
        (
            {"ingress": {"enabled": True, "tls": {"enabled": True, "secretName": ""}}},
            "ingress.tls.secretName",
        ),
        ({"sender": {"env": {"SENDER_SHUTDOWN_GRACE": 90}}}, "set it with sender.shutdownGraceSeconds"),
        ({"sender": {"env": {"SENDER_PORT": 9000}}}, "set it with sender.port"),
        ({"sender": {"env": {"SENDER_METRICS_PORT": 9000}}}, "set it with sender.metricsPort"),
        ({"sender": {"env": {"SENDER_MODELS": "a,b"}}}, "set it with the models list"),
        ({"sender": {"env": {"SENDER_COLD_START_SECONDS": 5}}}, "set it with sender.coldStartSeconds"),
        ({"sender": {"metricsPort": 8080}}, "sender.metricsPort: the metrics need a port of their own"),
        (
            {"consumer": {"env": {"CONSUMER_STATUS_PORT": 9500}}, "models": [{"name": "m", "model": "x"}]},
            "CONSUMER_STATUS_PORT, which comes from consumer.statusPort",
        ),
        (
            {"models": [{"name": "m", "model": "x", "consumerEnv": {"CONSUMER_SHUTDOWN_GRACE": 5}}]},
            'models "m": consumer.env / consumerEnv sets CONSUMER_SHUTDOWN_GRACE',
        ),
        (
            {"models": [{"name": "m", "model": "x", "consumerEnv": {"CONSUMER_VLLM_API_KEY": "k"}}]},
            "CONSUMER_VLLM_API_KEY, which comes from vllm.apiKey",
        ),
    ],
)
def test_template_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as raised:
        render(values)
    assert message in str(raised.value)


def values_leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    leaves = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and key not in {"resources", "securityContext", "podSecurityContext", "labels"}
        ):
            leaves += values_leaves(value, path + ".")
        else:
            leaves.append(path)
    return leaves


def test_every_value_is_documented() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    leaves = values_leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert not set(leaves) - documented, set(leaves) - documented
    fields = {f"{key}[].{field}" for key in ("models", "tokens") for field in list_fields(key)}
    assert not documented - set(leaves) - fields
    assert fields <= documented, fields - documented


def list_fields(key: str) -> set[str]:
    """The fields of each entry of the list ``key``, as the schema knows them."""
    return set(
        json.loads((CHART / "values.schema.json").read_text())["properties"][key]["items"]["properties"]
    )


def test_notes_tell_how_to_get_a_token_and_call() -> None:
    text = notes(case_values("one-model-values"))
    assert "https://llm.example.com/v1" in text
    assert "get secret webui-token" in text
    assert '"model": "llama-3.1-8b"' in text
    default = notes({})
    assert "port-forward service/rel-llm-dispatcher-sender" in default
    assert "create secret generic" in default
    assert "get rabbitmqcluster rel-llm-dispatcher-rabbitmq" in default  # the broker the chart made
    assert "Secret dispatcher-broker" in text  # an external one
    assert "waits in its queue" in notes(case_values("three-models-keda-values"))


def test_zero_and_false_overrides_are_kept() -> None:
    values: dict[str, Any] = {
        "consumer": {"env": {"CONSUMER_WAITING_TOLERANCE": 2}},
        "models": [
            {"name": "idle", "model": "x", "replicas": 0, "consumerEnv": {"CONSUMER_WAITING_TOLERANCE": 0}},
            {"name": "busy", "model": "y"},
        ],
        "keda": {"minReplicaCount": 1},
    }
    objects = render(values)
    idle = named(objects, "Deployment", "-model-idle")
    assert idle["spec"]["replicas"] == 0
    assert env(container(idle, "consumer"))["CONSUMER_WAITING_TOLERANCE"] == "0"
    busy = named(objects, "Deployment", "-model-busy")
    assert busy["spec"]["replicas"] == 1
    assert env(container(busy, "consumer"))["CONSUMER_WAITING_TOLERANCE"] == "2"
    values["keda"]["enabled"] = True
    values["rabbitmq"] = {"kedaUrlSecretKey": "keda-url"}
    values["models"][0]["keda"] = {"minReplicaCount": 0}
    scaled = {s["metadata"]["name"]: s["spec"] for s in of_kind(render(values), "ScaledObject")}
    assert scaled["rel-llm-dispatcher-model-idle"]["minReplicaCount"] == 0
    assert scaled["rel-llm-dispatcher-model-busy"]["minReplicaCount"] == 1


def test_dead_letter_retention_is_a_value() -> None:
    values = case_values("internal-trial-values")
    values["rabbitmq"]["deadLetterTTLSeconds"] = 120
    definitions = json.loads(
        named(render(values), "ConfigMap", "-rabbitmq-definitions")["data"]["definitions.json"]
    )
    policies = {p["name"]: p["definition"] for p in definitions["policies"]}
    assert policies["dispatch-dead-letter"]["message-ttl"] == 120_000
    assert policies["dispatch-model-queues"]["message-ttl"] == 3_600_000  # unchanged
