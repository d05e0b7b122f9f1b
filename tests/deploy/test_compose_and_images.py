"""docker-compose.yml and the Dockerfile: valid, wired to the services' real settings and commands,
and the same commands as the chart and the README (no Docker engine here to build or run them)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

import contract
from contract.broker_roles import ROLES, TOPIC_EXCHANGE
from harness.chart_render import HELPER_VARIABLES, ROOT, SETTINGS, case_values, of_kind, render_case
from harness.rabbitmq43 import SERIES as TESTED_RABBITMQ_SERIES
from harness.vllm_cpu import VERSION as TESTED_VLLM

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = {"sender": "sender", "consumer": "consumer", "simulator": "simulator"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    depends_on:", "    depends-on:", 1))
    assert check_compose(broken).returncode != 0


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage of the Dockerfile: its instructions as (keyword, arguments), line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            current = []
            found[arguments.split(" AS ")[-1].strip()] = current
        current.append((keyword.upper(), arguments.strip()))
    return found


def stage_chain(name: str) -> list[tuple[str, str]]:
    """A stage's instructions, with those of the stages it is built FROM first."""
    all_stages = stages()
    instructions = all_stages[name]
    parent = instructions[0][1].split(" AS ")[0].strip()
    return (stage_chain(parent) if parent in all_stages else []) + instructions


def test_base_image_is_pinned() -> None:
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(.*)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    for name, instructions in stages().items():
        assert instructions[0][1].split(" AS ")[0] in {"${PYTHON_IMAGE}", *stages()}, name


@pytest.mark.parametrize("target", TARGETS)
def test_images_run_as_non_root_without_build_tools(target: str) -> None:
    chain = stage_chain(target)
    users = [arguments for keyword, arguments in chain if keyword == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    runs = " ".join(arguments for keyword, arguments in chain if keyword == "RUN")
    assert not re.search(r"apt-get|apk |gcc|build-essential|make ", runs), runs
    # The final image gets only the virtualenv from the build stage.
    copies_from = [a for k, a in chain if k == "COPY" and a.startswith("--from")]
    assert copies_from == ["--from=build /opt/venv /opt/venv"]


@pytest.mark.parametrize("target", TARGETS)
def test_images_start_the_services_as_the_readme_does(target: str) -> None:
    chain = stage_chain(target)
    (cmd,) = [arguments for keyword, arguments in chain if keyword == "CMD"]
    assert yaml.safe_load(cmd) == ["python", "-m", target]
    assert importlib.util.find_spec(f"{target}.__main__") is not None
    assert f"`python -m {target}`" in (ROOT / "README.md").read_text()
    copied = {a.split()[0] for k, a in chain if k == "COPY" and not a.startswith("--from")}
    assert {"contract", target} <= copied
    # Each image listens on all interfaces: its variable is one the service reads.
    (host_variable,) = [a.split("=")[0] for k, a in chain if k == "ENV" and "_HOST=" in a]
    assert host_variable in SETTINGS[target]


def test_sender_image_ships_db_init() -> None:
    chain = stage_chain("sender")
    assert ("COPY", "db-init db-init") in chain
    assert ("WORKDIR", "/app") in chain
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!db-init/" in ignored


def test_readme_build_commands_use_the_dockerfile_targets() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^docker build .*$", readme, flags=re.MULTILINE)
    built = set()
    for command in commands:
        words = shlex.split(command)
        built.add(words[words.index("--target") + 1])
        assert words[-1] == "."
    assert built == set(TARGETS)
    for target in TARGETS:
        assert target in stages()


def test_compose_builds_the_dockerfile_targets() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            assert service["build"]["dockerfile"] == "Dockerfile"
            assert service["build"]["target"] in stages(), name
            assert service["image"] == f"llm-dispatcher-{service['build']['target']}:local", name


def compose_environment(service: dict[str, Any]) -> set[str]:
    return set(service.get("environment", {}))


def test_compose_sets_only_real_settings() -> None:
    for name, service in compose()["services"].items():
        match = re.match(r"llm-dispatcher-(\w+):", service.get("image", ""))
        if match:
            unknown = compose_environment(service) - SETTINGS[match.group(1)] - HELPER_VARIABLES
            assert not unknown, (name, unknown)


def test_compose_db_init_runs_what_the_chart_job_runs() -> None:
    """Both run the sender image's admin commands: the db-init/ scripts, then the tokens."""
    services = compose()["services"]
    (job,) = [
        j
        for j in of_kind(render_case("one-model-values"), "Job")
        if j["metadata"]["name"].endswith("-db-init")
    ]
    job_steps = [c["command"] for c in job["spec"]["template"]["spec"]["initContainers"]]
    assert services["db-init"]["command"] == job_steps[0] == ["python", "-m", "sender.admin", "migrate"]
    token = services["db-tokens"]["command"]
    assert token[:4] == job_steps[1][:4] == ["python", "-m", "sender.admin", "add-token"]
    assert token[4::2] == job_steps[1][4::2] == ["--name", "--priority", "--threshold", "--secret-file"]
    assert services["db-tokens"]["depends_on"]["db-init"]["condition"] == "service_completed_successfully"
    secret_file = token[token.index("--secret-file") + 1]
    assert secret_file == "/run/secrets/demo_token"
    demo_token = (ROOT / compose()["secrets"]["demo_token"]["file"]).read_text().strip()
    assert demo_token.startswith("sk-") and f"`{demo_token}`" in (ROOT / "README.md").read_text()
    assert services["sender"]["depends_on"]["db-tokens"]["condition"] == "service_completed_successfully"
    assert case_values("one-model-values")["tokens"]  # the Job above does create tokens


def test_compose_wiring() -> None:
    services = compose()["services"]
    rabbitmq = services["rabbitmq"]
    assert "./rabbitmq/rabbitmq.conf:/etc/rabbitmq/conf.d/90-dispatcher.conf:ro" in rabbitmq["volumes"]
    # RabbitMQ 4.3, pinned, the very image the chart gives its RabbitmqCluster.
    assert re.fullmatch(r"rabbitmq:4\.3\.\d+-management", rabbitmq["image"]), rabbitmq["image"]
    chart_values = yaml.safe_load((ROOT / "chart" / "values.yaml").read_text())
    assert rabbitmq["image"] == chart_values["rabbitmq"]["cluster"]["image"]
    init = services["broker-init"]
    assert "./rabbitmq/definitions.json:/definitions/definitions.json:ro" in init["volumes"]
    assert init["command"][-1] == "http://rabbitmq:15672/api/definitions"
    consumer = services["consumer"]["environment"]
    simulator = services["simulator"]["environment"]
    assert consumer["MODEL"] == simulator["SIMULATOR_MODEL"]
    assert consumer["VLLM_URL"] == f"http://simulator:{simulator['SIMULATOR_PORT']}"
    assert "gpu" in services["vllm"]["profiles"] and "gpu" in services["consumer-vllm"]["profiles"]
    vllm_args = services["vllm"]["command"]
    assert (
        services["consumer-vllm"]["environment"]["MODEL"]
        == vllm_args[vllm_args.index("--served-model-name") + 1]
    )
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["mysql"]["profiles"] == ["mysql"]
    assert "./rabbitmq/compose-users.json:/definitions/compose-users.json:ro" in init["volumes"]
    assert "@/definitions/compose-users.json" in init["command"]
    # definitions.json first: it declares the control exchange, without which 4.3 refuses the
    # users' topic permissions (tests/broker43/test_rabbitmq_files.py).
    command = init["command"]
    assert command.index("@/definitions/definitions.json") < command.index("@/definitions/compose-users.json")
    definitions = json.loads((ROOT / "rabbitmq" / "definitions.json").read_text())
    assert contract.CONTROL_EXCHANGE in {e["name"] for e in definitions["exchanges"]}
    # Each role its own broker user, with the permissions of contract/broker_roles.py.
    users = json.loads((ROOT / "rabbitmq" / "compose-users.json").read_text())
    hashes = {user["name"]: user["password_hash"] for user in users["users"]}
    for name, role in (("sender", "sender"), ("consumer", "consumer"), ("consumer-vllm", "consumer")):
        url = urllib.parse.urlsplit(services[name]["environment"]["RABBITMQ_URL"])
        assert (url.scheme, url.hostname, url.port, url.username) == (
            "amqp",
            "rabbitmq",
            5672,
            f"dispatch-{role}",
        )
        assert url.password is not None and rabbit_password_matches(hashes[url.username], url.password)
    for entry in users["permissions"]:
        granted = ROLES[entry["user"].removeprefix("dispatch-")]
        assert (entry["vhost"], entry["configure"], entry["write"], entry["read"]) == (
            "/",
            granted.configure,
            granted.write,
            granted.read,
        )
    for entry in users["topic_permissions"]:
        granted = ROLES[entry["user"].removeprefix("dispatch-")]
        assert (entry["exchange"], entry["write"], entry["read"]) == (
            TOPIC_EXCHANGE,
            granted.topic_write,
            granted.topic_read,
        )
    assert all(not user["tags"] for user in users["users"])
    # vLLM of the gpu profile sits on the compose network: the consumer holds its key.
    assert (
        services["vllm"]["environment"]["VLLM_API_KEY"]
        == (services["consumer-vllm"]["environment"]["CONSUMER_VLLM_API_KEY"])
    )


def rabbit_password_matches(password_hash: str, password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    raw = base64.b64decode(password_hash)
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


IMPORT_FROM_IMAGE_LAYOUT = """
import importlib, sys
# Forget the project's editable install: only what the image copies into /app may be found.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_importer_cache.clear()
sys.path.insert(0, ".")
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


def image_layout(target: str, app: Path) -> None:
    """Copy what the target's stages COPY from the build context, as the image's /app holds it."""
    for keyword, arguments in stage_chain(target):
        if keyword == "COPY" and not arguments.startswith("--from"):
            *sources, destination = arguments.split()
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(
                        path, app / destination / "" if destination == "./" else app / destination
                    )


def import_in(app: Path, *modules: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_FROM_IMAGE_LAYOUT, *modules],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("target", TARGETS)
def test_image_holds_what_its_service_imports(target: str, tmp_path: Path) -> None:
    image_layout(target, tmp_path)
    modules = [f"{target}.__main__", *(["sender.admin"] if target == "sender" else [])]
    result = import_in(tmp_path, *modules)
    assert result.returncode == 0, result.stderr
    # The check has teeth: another service's package is not there.
    other = next(name for name in TARGETS if name != target)
    assert import_in(tmp_path, f"{other}.__main__").returncode != 0


def test_dockerfile_follows_the_usual_rules() -> None:
    """What hadolint (not installable here) would check first."""
    instructions = [(k, a) for stage in stages().values() for k, a in stage]
    assert not [a for k, a in instructions if k == "ADD"]  # COPY, never ADD
    assert all(a.startswith("[") for k, a in instructions if k in {"CMD", "ENTRYPOINT"})  # exec form
    env = " ".join(a for k, a in stage_chain("build") if k == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env
    assert all(not a.startswith("cd ") for k, a in instructions if k == "RUN")  # WORKDIR instead


def third_party_images() -> list[str]:
    images = [
        s["image"] for s in compose()["services"].values() if not s["image"].startswith("llm-dispatcher-")
    ]
    values = yaml.safe_load((ROOT / "chart" / "values.yaml").read_text())
    images += [
        f"{values['vllm']['image']['repository']}:{values['vllm']['image']['tag']}",
        values["rabbitmq"]["definitionsJobImage"],
        values["rabbitmq"]["cluster"]["image"],
        values["database"]["postgres"]["image"],
    ]
    return images


def test_third_party_images_are_pinned_to_releases() -> None:
    for image in third_party_images():
        name, _, tag = image.rpartition(":")
        assert name and re.search(r"\d+\.\d+", tag) and "latest" not in tag, image


def test_deployed_rabbitmq_is_the_series_the_broker43_tests_run() -> None:
    images = [image for image in third_party_images() if image.startswith("rabbitmq:")]
    assert len(images) == 2  # compose's broker and the chart's RabbitmqCluster
    assert all(image.startswith(f"rabbitmq:{TESTED_RABBITMQ_SERIES}.") for image in images), images


def test_deployed_vllm_is_the_release_the_end_to_end_tests_run() -> None:
    vllm_images = [image for image in third_party_images() if image.startswith("vllm/vllm-openai:")]
    assert len(vllm_images) == 2  # compose's gpu profile and the chart
    assert all(image.endswith(f":v{TESTED_VLLM}") for image in vllm_images), vllm_images


def test_compose_sender_metrics_reach_the_compose_network_only() -> None:
    sender = compose()["services"]["sender"]
    environment = sender["environment"]
    assert environment["SENDER_METRICS_HOST"] == "0.0.0.0"  # the default, 127.0.0.1, is the container's own
    port = environment["SENDER_METRICS_PORT"]
    assert port != environment["SENDER_PORT"]
    assert not [published for published in sender["ports"] if str(published).endswith(f":{port}")]


def test_compose_hashes_tokens_with_a_pepper() -> None:
    spec = compose()
    services = spec["services"]
    for name in ("sender", "db-tokens"):  # both hash alike: the demo token must be found
        assert services[name]["environment"]["SENDER_TOKEN_PEPPER_FILE"] == "/run/secrets/token_pepper", name
        assert "token_pepper" in services[name]["secrets"], name
        assert "SENDER_TOKEN_PEPPER" not in services[name]["environment"], name
    pepper_file = spec["secrets"]["token_pepper"]["file"]
    pepper = (ROOT / pepper_file).read_text().strip()
    assert len(pepper) >= 32
    raw = (ROOT / "docker-compose.yml").read_text()
    assert "openssl rand -hex 32 > deploy/demo-token-pepper" in raw  # the comment says how to change it
    assert "deploy/demo-token-pepper" in (ROOT / "README.md").read_text()
