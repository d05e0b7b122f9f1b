"""Render the Helm chart with Helm's own engine (the Go SDK through helm-python-sdk), offline."""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import helm_python
import yaml
from helm_python import _native
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from consumer.settings import ConsumerSettings
from sender.settings import SenderSettings
from simulator.settings import SimulatorSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "chart"
CI_VALUES = {path.stem: path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
CASES = ["default", *CI_VALUES]
RELEASE = "rel"
NAMESPACE = "llm"

OPERATOR_APIS = (
    "rabbitmq.com/v1beta1/RabbitmqCluster",  # the RabbitMQ cluster operator
    "rabbitmq.com/v1beta1/User",  # the messaging-topology-operator
)
"""What a cluster with the RabbitMQ operators answers to ``.Capabilities.APIVersions.Has``: the
chart's default (no broker values) creates its broker only where they exist."""

# The variables the chart and compose may set on each of our containers.
HELPER_VARIABLES = {"RABBITMQ_USERNAME", "RABBITMQ_PASSWORD"}  # only expanded into RABBITMQ_URL


def setting_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (its aliases, or prefix + field name)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        else:
            names.add((prefix + name).upper())
    return names


SETTINGS = {
    "sender": setting_names(SenderSettings),
    "consumer": setting_names(ConsumerSettings),
    "simulator": setting_names(SimulatorSettings),
}


def case_values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    loaded: dict[str, Any] = yaml.safe_load(CI_VALUES[case].read_text())
    return loaded


@functools.cache
def chart() -> helm_python.Chart:
    helm_python.disable_logging()
    return helm_python.Chart.load(CHART)


def render_files(values: dict[str, Any], api_versions: Collection[str] = OPERATOR_APIS) -> dict[str, str]:
    """The rendered templates, as ``helm install`` would make them on a cluster serving ``api_versions``
    (besides the built-in ones): by default one where the RabbitMQ operators are installed.

    helm-python-sdk's ``Chart.render`` has no parameter for them (``helm template --api-versions``),
    but its native call reads ``api_versions`` from the same options.
    """
    options = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "is_install": True,
        "api_versions": list(api_versions),
    }
    rendered = _native.call_string("helm_render", chart()._raw(), json.dumps(values), json.dumps(options))
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def render(values: dict[str, Any], api_versions: Collection[str] = OPERATOR_APIS) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders with ``values`` (on a cluster serving ``api_versions``)."""
    objects = []
    for path, text in render_files(values, api_versions).items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@functools.cache
def _render_case(case: str) -> str:
    dumped: str = yaml.safe_dump_all(render(case_values(case)))
    return dumped


def render_case(case: str) -> list[dict[str, Any]]:
    """The objects of a named case (fresh copies: tests may change them)."""
    return [doc for doc in yaml.safe_load_all(_render_case(case)) if doc]


def notes(values: dict[str, Any]) -> str:
    return next(text for path, text in render_files(values).items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, (
        f"{kind} *{suffix}: {[obj['metadata']['name'] for obj in of_kind(objects, kind)]}"
    )
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    return None


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(obj)
    assert spec is not None
    return next(c for c in containers(spec) if c["name"] == name)


def env(container: dict[str, Any]) -> dict[str, Any]:
    """Name to value (or valueFrom) of a container's environment."""
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}
