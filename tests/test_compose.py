"""The Docker Compose stack, checked by reading it (Docker is not needed to run these tests)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = {
    "airflow-api-server": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
ALL_AIRFLOW = [*AIRFLOW_SERVICES, "airflow-init"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (or volume name) of a service's volumes (short syntax)."""
    out = {}
    for item in service.get("volumes", []):
        host, container, *_ = item.split(":")
        out[container] = host
    return out


def test_every_service_of_the_stack_is_there(services):
    expected = {*AIRFLOW_SERVICES, "airflow-init", "redis", "metadata-db", "crm-db", "ticketing-sim", "mailpit",
                "crm-sync-seed"}
    assert expected <= set(services)
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
    assert services["metadata-db"]["image"] == "postgres:17"
    assert services["crm-db"]["image"] == "postgres:17"
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    assert services["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", ALL_AIRFLOW)
def test_airflow_services_share_image_executor_and_mounts(services, name):
    service = services[name]
    assert "apache/airflow:3.3.2-python3.11" in service["image"]
    env = service["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert "@metadata-db:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    mounts = _mounts(service)
    for folder in ("dags", "plugins", "include"):
        assert mounts[f"/opt/airflow/{folder}"] == f"./{folder}", folder
    for conn_id in ("CRM_DB", "ERP_SRC", "TICKETING_API", "SMTP_ALERTS"):
        assert f"AIRFLOW_CONN_{conn_id}" in env, conn_id


def test_connections_come_from_variables_with_defaults_and_no_literal_token(services):
    env = services["airflow-worker"]["environment"]
    assert "@crm-db:5432/" in env["AIRFLOW_CONN_CRM_DB"]
    assert re.search(r"\$\{CRM_DB_PASSWORD:-[^}]*\}", env["AIRFLOW_CONN_CRM_DB"])
    assert "${TICKETING_API_TOKEN" in env["AIRFLOW_CONN_TICKETING_API"]
    assert '"conn_type": "http"' in env["AIRFLOW_CONN_TICKETING_API"]
    smtp = env["AIRFLOW_CONN_SMTP_ALERTS"]
    assert '"conn_type": "smtp"' in smtp and "${SMTP_HOST:-mailpit}" in smtp and "${SMTP_PORT:-1025}" in smtp
    assert "${TICKETING_API_TOKEN" in services["ticketing-sim"]["environment"]["TICKETING_API_TOKEN"]
    seed_env = services["crm-sync-seed"]["environment"]
    assert seed_env["CRM_SYNC_DSN"].startswith("postgresql://") and "@crm-db:5432/" in seed_env["CRM_SYNC_DSN"]


def test_simulator_and_seed_commands(services):
    sim = services["ticketing-sim"]
    assert sim["command"] == ["python", "-m", "crm_sync.simulators.ticketing", "--host", "0.0.0.0", "--port", "8765"]
    seed = services["crm-sync-seed"]
    script = seed["command"][-1]
    compile(script, "crm-sync-seed", "exec")
    assert "db.migrate" in script and "erp.seed" in seed["command"][-1]
    assert seed["restart"] == "no"


def test_init_migrates_and_installs_requirements(services):
    init = services["airflow-init"]
    script = init["command"][-1]
    assert "airflow db migrate" in script
    assert "pip install" in script and "requirements.txt" in script
    assert init["restart"] == "no"


def test_healthchecks_and_startup_order(services):
    for name in [*AIRFLOW_SERVICES, "redis", "metadata-db", "crm-db", "ticketing-sim", "mailpit"]:
        assert services[name]["healthcheck"]["test"], name
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["metadata-db"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
    worker = services["airflow-worker"]["depends_on"]
    assert worker["crm-db"]["condition"] == "service_healthy"
    assert worker["crm-sync-seed"]["condition"] == "service_completed_successfully"
    assert services["crm-sync-seed"]["depends_on"]["crm-db"]["condition"] == "service_healthy"
    assert services["airflow-init"]["depends_on"]["metadata-db"]["condition"] == "service_healthy"


def test_every_variable_reference_is_well_formed():
    text = (ROOT / "docker-compose.yaml").read_text(encoding="utf-8")
    for ref in re.findall(r"(?<!\$)\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*(?:(?::-|:\?)[^${}]*)?", ref), ref
