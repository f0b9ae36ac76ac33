"""deploy/kubernetes: offline schema validation of every manifest with
kubernetes-validate (strict: unknown fields are errors), plus the cross-references
a schema cannot see (selectors, names, probes, security)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from deploy_support import (
    KUBERNETES_DIR,
    all_kubernetes_documents,
    kubernetes_documents,
    kubernetes_manifests,
    load_dockerfile,
    settings_variables,
)

# Schemas shipped inside the kubernetes-validate wheel; no network is used.
KUBERNETES_VERSIONS = ("1.31.0", "1.34.0")
NAMESPACE = "exosphere"

Document = dict[str, Any]


def find(kind: str, name: str | None = None) -> Document:
    matches = [
        doc
        for _, doc in all_kubernetes_documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def deployment() -> Document:
    return find("Deployment", "state-manager")


def server_container() -> Document:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Document = containers[0]
    return container


def pod_specs() -> list[tuple[str, Document]]:
    specs: list[tuple[str, Document]] = []
    for _, doc in all_kubernetes_documents():
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            specs.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]))
    return specs


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "path", kubernetes_manifests(), ids=lambda p: p.relative_to(KUBERNETES_DIR).as_posix()
)
def test_manifest_validates_offline(path: Path, version: str) -> None:
    documents = kubernetes_documents(path)
    assert documents, f"{path} holds no resource"
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            location = ".".join(str(part) for part in error.path)
            pytest.fail(f"{path.name} {document['kind']}: {location}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(error.message)


def test_validator_rejects_an_unknown_field() -> None:
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"prots": [{"port": 80}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)


def test_manifests_are_numbered_for_apply_order() -> None:
    for folder in (KUBERNETES_DIR, KUBERNETES_DIR / "postgres"):
        names = sorted(p.name for p in folder.glob("*.yaml"))
        assert names, folder
        prefixes = [name.split("-", 1)[0] for name in names]
        assert all(re.fullmatch(r"\d\d", prefix) for prefix in prefixes), names
        assert len(set(prefixes)) == len(prefixes), f"duplicate order number in {names}"
    first = sorted(KUBERNETES_DIR.glob("*.yaml"))[0]
    assert [d["kind"] for d in kubernetes_documents(first)] == ["Namespace"]


def test_every_resource_is_in_the_namespace() -> None:
    find("Namespace", NAMESPACE)
    for path, doc in all_kubernetes_documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name} {doc['kind']}"


def test_deployment_runs_three_replicas_of_the_image_command() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] == 3
    container = server_container()
    # The image's own ENTRYPOINT/CMD must be used, not a divergent command line.
    assert "command" not in container and "args" not in container
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())


def test_deployment_probes() -> None:
    container = server_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http"


def test_every_container_has_requests_and_limits() -> None:
    for name, template in pod_specs():
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{name}: {part}"


@pytest.mark.parametrize("name_and_template", pod_specs(), ids=lambda item: item[0])
def test_pods_are_non_root_with_read_only_root_filesystems(
    name_and_template: tuple[str, Document],
) -> None:
    name, template = name_and_template
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["runAsUser"] != 0, name
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False, name
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounted, f"{name}: a read-only root needs a writable /tmp"


def test_server_pods_run_as_the_image_user_with_writable_data_dir() -> None:
    user = load_dockerfile().final.last("USER")
    assert user is not None
    uid = int(user.arguments.split(":")[0])
    config = find("ConfigMap", "state-manager-config")["data"]
    for name, template in pod_specs():
        if "state-manager" not in name:
            continue
        pod = template["spec"]
        assert pod["securityContext"]["runAsUser"] == uid, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        data = mounts[config["EXOSPHERE_DATA_DIR"]]
        assert "emptyDir" in volumes[data], name
        assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_configuration_comes_from_the_configmap_and_secret() -> None:
    names = {doc["metadata"]["name"]: doc["kind"] for _, doc in all_kubernetes_documents()}
    for pod_name, template in pod_specs():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        assert names.get(source[key]["name"]) == kind, pod_name


def test_configmap_and_secret_hold_only_real_settings() -> None:
    known = set(settings_variables())
    config = find("ConfigMap", "state-manager-config")["data"]
    secret = find("Secret", "state-manager-secrets")["stringData"]
    assert set(config) <= known, set(config) - known
    assert set(secret) <= known, set(secret) - known
    assert config["MODE"] == "production"
    assert config["EXOSPHERE_AUTO_MIGRATE"] == "false"
    assert {"STATE_MANAGER_SECRET", "SECRETS_ENCRYPTION_KEY", "DATABASE_URL"} <= set(secret)
    assert not set(config) & set(secret), "a value must come from one place only"


def test_secret_values_are_marked_placeholders() -> None:
    for path, doc in all_kubernetes_documents():
        if doc["kind"] != "Secret":
            continue
        text = path.read_text()
        assert "kubectl" in text and "create secret" in text, f"{path.name}: how to generate"
        for key, value in doc["stringData"].items():
            if key in {"POSTGRES_USER", "POSTGRES_DB"}:
                continue
            assert "REPLACE_ME" in value, f"{path.name}: {key} is not a marked placeholder"


def test_migration_job_uses_the_same_image_and_settings() -> None:
    job = find("Job", "state-manager-migrate")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["migrate"]
    assert container["image"] == server_container()["image"]
    assert container["envFrom"] == server_container()["envFrom"]


def test_service_selects_the_server_pods_and_ingress_routes_to_it() -> None:
    service = find("Service", "state-manager")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    port_names = {p["name"] for p in server_container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    ingress = find("Ingress", "state-manager")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_optional_postgres_is_self_contained_and_matches_database_url() -> None:
    statefulset = find("StatefulSet", "postgres")
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:16"
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert claims and claims[0]["spec"]["resources"]["requests"]["storage"]
    service = find("Service", "postgres")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    url = find("Secret", "state-manager-secrets")["stringData"]["DATABASE_URL"]
    host = f"@{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:5432/"
    assert url.startswith("postgresql://") and host in url
    credentials = find("Secret", "postgres-credentials")["stringData"]
    assert url.endswith("/" + credentials["POSTGRES_DB"])
    assert url.startswith(f"postgresql://{credentials['POSTGRES_USER']}:")


def test_the_secrets_mongodb_alternative_is_accepted_by_the_server() -> None:
    """Uncommenting the MongoDB lines of the Secret (and deleting DATABASE_URL) gives
    settings the server starts with: MongoDB selected, the guide's database name."""
    from state_manager.settings import Settings

    text = (KUBERNETES_DIR / "20-secret.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("  DATABASE_URL:")]
    text = "\n".join(line.replace("  # MONGO_", "  MONGO_") for line in lines)
    secret = yaml.safe_load(text)["stringData"]
    assert "DATABASE_URL" not in secret and set(secret) <= set(settings_variables())
    env = {**secret, "SECRETS_ENCRYPTION_KEY": "c2FtcGxlLWtleS1zYW1wbGUta2V5LXNhbXBsZS1rZXk="}
    settings = Settings.from_env(env)
    assert settings.mongo_uri.startswith("mongodb+srv://") and not settings.database_url
    assert settings.mongo_database_name == "exosphere"
