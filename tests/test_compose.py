"""The Docker Compose stack and its image, checked by reading docker-compose.yaml, the Dockerfile and
.dockerignore (Docker is not needed to run these tests); the seed job's script also runs against a
real PostgreSQL (an integration test)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

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
API_SIMULATORS = ["ticketing-sim", "im-sim", "callcenter-sim"]
# every container that imports crm-sync: the Airflow components, the seed job, the simulators
RUNS_CRM_SYNC = [*ALL_AIRFLOW, "crm-sync-seed", *API_SIMULATORS]
SOURCES = sorted((ROOT / "include" / "sources").glob("*.yaml"))
# `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, and `$$` for a literal `$`
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def sources() -> list[dict]:
    return [yaml.safe_load(path.read_text(encoding="utf-8")) for path in SOURCES]


def _interpolate(text: str, env: dict[str, str]) -> str:
    """What `docker compose` makes of `text` with `env` (its variable interpolation rules)."""
    def value(match: re.Match) -> str:
        name, op, arg = match.groups()
        if name is None:
            return "$"
        unset = name not in env or (op or "").startswith(":") and not env[name]   # ":" also means empty
        if op and unset:
            if "?" in op:
                raise AssertionError(f"{name} is required: {arg}")
            return arg
        return env.get(name, "")
    return _VARIABLE.sub(value, text)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The services as compose runs them with only the required variables set (each to its own value)."""
    text = (ROOT / "docker-compose.yaml").read_text(encoding="utf-8")
    required = {m.group(1) for m in _VARIABLE.finditer(text) if m.group(2) and "?" in m.group(2)}
    env = {name: f"test-{name.lower().replace('_', '-')}" for name in required}
    return yaml.safe_load(_interpolate(text, env))["services"]


def _conn_ids(node) -> set[str]:
    """Every connection id a source YAML names (conn_id, crm_conn_id, alerts.smtp_conn_id, ...)."""
    if isinstance(node, dict):
        return {v for k, v in node.items() if k.endswith("conn_id") and isinstance(v, str)} | \
            {c for v in node.values() for c in _conn_ids(v)}
    if isinstance(node, list):
        return {c for v in node for c in _conn_ids(v)}
    return set()


def _connection(env: dict, conn_id: str) -> dict:
    """An `AIRFLOW_CONN_*` value (JSON or URL form, already interpolated) as a dict."""
    value = env[f"AIRFLOW_CONN_{conn_id.upper()}"]
    if value.lstrip().startswith("{"):
        return json.loads(value)
    url = urlparse(value)
    return {"conn_type": url.scheme, "host": url.hostname, "port": url.port, "login": url.username,
            "password": url.password, "schema": url.path.lstrip("/")}


def _port_arg(command: list[str]) -> int:
    return int(command[command.index("--port") + 1])


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (or volume name) of a service's volumes (short syntax)."""
    out = {}
    for item in service.get("volumes", []):
        host, container, *_ = item.split(":")
        out[container] = host
    return out


def test_every_service_of_the_stack_is_there(services):
    expected = {*AIRFLOW_SERVICES, "airflow-init", "redis", "metadata-db", "crm-db", *API_SIMULATORS, "mailpit",
                "crm-sync-seed"}
    assert expected <= set(services)
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
    assert services["metadata-db"]["image"] == "postgres:17"
    assert services["crm-db"]["image"] == "postgres:17"
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    assert services["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", ALL_AIRFLOW)
def test_airflow_services_share_executor_and_mounts(services, name):
    service = services[name]
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
    assert re.search(r"\$\{CRM_LOADER_PASSWORD:\?[^}]*\}", env["AIRFLOW_CONN_CRM_DB"])
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


def test_init_migrates_and_installs_nothing(services):
    init = services["airflow-init"]
    script = init["command"][-1]
    assert "airflow db migrate" in script
    assert init["restart"] == "no"
    # what crm-sync needs is in the image: no container installs packages when it starts
    for name, service in services.items():
        command = service.get("command") or []
        assert "pip install" not in " ".join(command if isinstance(command, list) else [command]), name


def test_healthchecks_and_startup_order(services):
    for name in [*AIRFLOW_SERVICES, "redis", "metadata-db", "crm-db", *API_SIMULATORS, "mailpit"]:
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


@pytest.mark.parametrize("name", ALL_AIRFLOW)
def test_every_connection_the_sources_name_is_set(services, sources, name):
    env = services[name]["environment"]
    for conn_id in sorted(set().union(*map(_conn_ids, sources))):
        assert f"AIRFLOW_CONN_{conn_id.upper()}" in env, conn_id


def test_connections_are_valid_once_interpolated(resolved):
    env = resolved["airflow-worker"]["environment"]
    for key, value in env.items():
        if key.startswith("AIRFLOW_CONN_") and value.lstrip().startswith("{"):
            assert json.loads(value)["conn_type"], key


def test_each_api_simulator_serves_the_connection_of_its_source(resolved, sources):
    env = resolved["airflow-worker"]["environment"]
    worker_deps = resolved["airflow-worker"]["depends_on"]
    for cfg in (c for c in sources if c["kind"] == "http"):
        module = f"crm_sync.simulators.{cfg['source']}"
        sims = [name for name, svc in resolved.items() if module in svc.get("command", [])]
        assert len(sims) == 1, (cfg["source"], sims)
        sim = resolved[sims[0]]
        conn = _connection(env, cfg["conn_id"])
        assert conn["conn_type"] == "http" and conn["host"] == sims[0], cfg["conn_id"]
        assert conn["port"] == _port_arg(sim["command"]) and conn["port"] in sim["expose"], cfg["conn_id"]
        assert sim["command"][sim["command"].index("--host") + 1] == "0.0.0.0"
        assert str(conn["port"]) in " ".join(sim["healthcheck"]["test"])
        assert worker_deps[sims[0]]["condition"] == "service_healthy"
        # the simulator accepts what the connection sends: the same variables feed both
        assert conn["password"] in sim["environment"].values(), cfg["conn_id"]
        if conn.get("login"):
            assert conn["login"] in sim["environment"].values(), cfg["conn_id"]


def _runs_crm_sync(service: dict) -> bool:
    """Whether a container imports crm-sync: an Airflow component (it parses the DAGs, runs their tasks
    or migrates for them) or a command that names crm_sync."""
    env = service.get("environment") or {}
    command = service.get("command") or []
    text = " ".join(command) if isinstance(command, list) else str(command)
    return (any(key.startswith(("AIRFLOW__", "AIRFLOW_CONN_")) for key in env) or "crm_sync" in text
            or re.search(r"\bairflow\b", text) is not None)


def test_every_service_that_runs_crm_sync_uses_the_image_built_from_the_dockerfile(services, resolved):
    """The stock Airflow image lacks pypinyin, opencc and the rest of requirements.txt: on it the seed
    job failed, the worker waited for it and no task ran."""
    running = sorted(name for name, service in services.items() if _runs_crm_sync(service))
    assert set(RUNS_CRM_SYNC) <= set(running), running
    images = {services[name].get("image") for name in running}
    # one name: compose builds the image once and every container runs the same one
    assert len(images) == 1, images
    assert not resolved[running[0]]["image"].startswith("apache/"), "the stock image lacks crm-sync's requirements"
    for name in running:
        build = services[name].get("build")
        assert build, f"{name} runs crm-sync on an image that is not built from the Dockerfile"
        build = {"context": build} if isinstance(build, str) else build
        dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.resolve() == ROOT / "Dockerfile", name


@pytest.mark.parametrize("name", RUNS_CRM_SYNC)
def test_the_checkouts_code_runs_in_every_container(services, name):
    """The image has a copy of crm-sync; the mounted checkout comes first on the path, the same in
    every container, so a worker never runs other code than the seed job or the simulators."""
    service = services[name]
    mounts = _mounts(service)
    assert mounts["/opt/airflow/plugins"] == "./plugins" and mounts["/opt/airflow/include"] == "./include", name
    assert service["environment"]["PYTHONPATH"].split(":")[0] == "/opt/airflow/plugins", name


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    steps = []
    for line in map(str.strip, text.splitlines()):
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def _copies(steps) -> dict[str, str]:
    """build-context source -> destination in the image, of every COPY from the context."""
    out = {}
    for instruction, arg in steps:
        if instruction == "COPY" and "--from" not in arg:
            *sources, dest = [part for part in arg.split() if not part.startswith("--")]
            out.update(dict.fromkeys(sources, dest))
    return out


def _pins() -> dict[str, str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return {m[1].lower(): m[2] for m in (re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line) for line in lines) if m}


def test_the_image_is_the_pinned_airflow_plus_requirements_and_the_package(services):
    steps = _dockerfile()
    pins = _pins()
    args = dict(arg.split("=", 1) for instruction, arg in steps if instruction == "ARG" and "=" in arg)
    base = next(arg for instruction, arg in steps if instruction == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
    assert base == f"apache/airflow:{pins['apache-airflow']}-python3.11"
    assert '">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    copies = _copies(steps)
    # requirements.txt, the whole of it but the installer's own pip and setuptools, as the airflow user,
    # naming the base image's Airflow version beside it (requirements.txt pins Airflow too)
    install = next(arg for instruction, arg in steps if instruction == "RUN" and re.search(r"pip install .*-r ", arg))
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install
    requirements = re.search(r"-r (\S+)", install)[1]
    if requirements != copies["requirements.txt"]:
        made = re.search(rf"grep -vE '([^']+)' {re.escape(copies['requirements.txt'])} > {re.escape(requirements)}",
                         install)
        assert made, install
        dropped = {name for name, version in pins.items() if re.search(made[1], f"{name}=={version}")}
        assert dropped <= {"pip", "setuptools"}, dropped
    # the crm-sync package from pyproject.toml and plugins/crm_sync
    project = copies["pyproject.toml"].rsplit("/", 1)[0]
    assert copies["plugins/crm_sync"] == f"{project}/plugins/crm_sync"
    assert any(instruction == "RUN" and re.search(rf"pip install .*{re.escape(project)}(\s|$)", arg)
               for instruction, arg in steps)
    # what the package reads at run time, where the containers' CRM_SYNC_HOME says
    home = services["airflow-worker"]["environment"]["CRM_SYNC_HOME"]
    assert ("ENV", f"CRM_SYNC_HOME={home}") in steps
    assert copies["include"] == f"{home}/include" and copies["dags"] == f"{home}/dags"
    user = "airflow"   # the base image's
    for instruction, arg in steps:
        user = arg.split(":")[0] if instruction == "USER" else user
        if instruction == "RUN" and "pip install" in arg:
            assert user == "airflow", arg   # the image's documented way; as root its pip refuses
    assert user == "airflow"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether docker leaves `path` out of the build context: the last pattern that matches it or one
    of its parent folders decides, and `!` takes it back in."""
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}   # `*` and `?` stay in a folder
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.lstrip("!").strip("/"))
        glob = "".join(wildcards.get(token, re.escape(token)) for token in tokens)
        if any(re.fullmatch(glob, prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_build_context_has_what_the_dockerfile_copies_and_no_local_state():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for source in _copies(_dockerfile()):
        path = ROOT / source
        files = [path] if path.is_file() else \
            [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert files, source
        for file in files:
            assert not _dockerignored(file.relative_to(ROOT).as_posix(), patterns), file
    # the venv, the embedded PostgreSQL's data, git, the stack's secrets, build leftovers
    for path in (".venv/bin/python", ".local/pg/PG_VERSION", ".git/HEAD", ".env", "tests/test_compose.py",
                 "plugins/crm_sync.egg-info/PKG-INFO", "plugins/crm_sync/__pycache__/db.cpython-311.pyc",
                 "dags/__pycache__/crm_sync__erp.cpython-311.pyc"):
        assert _dockerignored(path, patterns), path


def test_every_pool_the_sources_name_is_created_by_the_init(services, sources):
    script = services["airflow-init"]["command"][-1]
    created = dict(re.findall(r"airflow pools set (\S+) (\d+)", script))
    pools = {c["pool"]: c.get("pool_slots", 1) for c in sources if c.get("pool")}
    assert {"ticketing_api", "im_api", "callcenter_api"} <= set(pools)
    for pool, slots in pools.items():
        assert created.get(pool) == str(slots), pool


def test_no_literal_secrets(services, sources):
    env = services["airflow-worker"]["environment"]
    whole_ref = r"\$\{[A-Z_][A-Z0-9_]*(?::-|:\?)[^}]*\}"
    required_ref = r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}"
    for key, value in env.items():
        if not key.startswith("AIRFLOW_CONN_"):
            continue
        json_passwords = re.findall(r'"password": "([^"]*)"', value)
        url_passwords = re.findall(r"^\w+://(?:\$\{[^}]*\}|[^:/@$]*):(\$\{[^}]*\}|[^@]*)@", value)
        for password in json_passwords + url_passwords:
            assert re.fullmatch(whole_ref, password), key
    # the APIs' secrets and the pipeline's database passwords have no default: the stack refuses to start without them
    # (only crm-db's own superuser keeps a documented local-development default, and the pipeline never uses it)
    for cfg in sources:
        value = env[f"AIRFLOW_CONN_{cfg['conn_id'].upper()}"]
        if cfg["kind"] == "http":
            assert re.fullmatch(required_ref, re.search(r'"password": "([^"]*)"', value).group(1)), cfg["conn_id"]
    for conn_id in ("CRM_DB", "ERP_SRC", "FINANCE_SRC"):
        password = re.match(r"postgresql://\$\{[^}]*\}:(\$\{[^}]*\})@", env[f"AIRFLOW_CONN_{conn_id}"]).group(1)
        assert re.fullmatch(required_ref, password), conn_id
    for name in [*API_SIMULATORS, "crm-sync-seed"]:
        for key, value in services[name]["environment"].items():
            if re.search(r"TOKEN|API_KEY|PASSWORD", key):
                assert re.fullmatch(required_ref, value), (name, key)
    # crm-db's superuser reaches only the seed job, inside its DSN
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if "CRM_DB_PASSWORD" in str(value):
                assert (name, key) in {("crm-db", "POSTGRES_PASSWORD"), ("crm-sync-seed", "CRM_SYNC_DSN")}, (name, key)


def test_finance_database_is_seeded_and_read_through_its_own_role(resolved):
    conn = _connection(resolved["airflow-worker"]["environment"], "finance_src")
    seed = resolved["crm-sync-seed"]
    seed_env = seed["environment"]
    assert conn["conn_type"] == "postgresql" and conn["host"] == "crm-db" and conn["port"] == 5432
    assert conn["schema"] == seed_env["FINANCE_DB_NAME"]
    assert (conn["login"], conn["password"]) == (seed_env["FINANCE_DB_USER"], seed_env["FINANCE_DB_PASSWORD"])
    assert conn["login"] != urlparse(seed_env["CRM_SYNC_DSN"]).username   # not crm-db's superuser
    script = seed["command"][-1]
    assert "ensure_database" in script and "finance.seed(" in script and "cw.kh_zl" in script
    # the reader reads the four source tables, never the simulator's answer key cw.truth*
    assert "finance.ensure_reader(" in script
    from crm_sync.simulators import finance

    assert finance.READABLE_TABLES == ("kh_zl", "fp", "ht", "sk")


def test_the_pipeline_connects_through_least_privileged_logins_the_seed_creates(resolved):
    """crm-db's superuser creates roles and runs migrations as crm_owner; the pipeline never uses it."""
    env = resolved["airflow-worker"]["environment"]
    seed = resolved["crm-sync-seed"]
    seed_env, script = seed["environment"], seed["command"][-1]
    superuser = resolved["crm-db"]["environment"]["POSTGRES_USER"]
    assert urlparse(seed_env["CRM_SYNC_DSN"]).username == superuser      # the seed job is the administrator
    crm, erp = _connection(env, "crm_db"), _connection(env, "erp_src")
    assert (crm["login"], crm["password"]) == (seed_env["CRM_LOADER_USER"], seed_env["CRM_LOADER_PASSWORD"])
    assert (erp["login"], erp["password"]) == (seed_env["ERP_DB_USER"], seed_env["ERP_DB_PASSWORD"])
    for name in ALL_AIRFLOW:
        for key, value in resolved[name]["environment"].items():
            if key.startswith("AIRFLOW_CONN_") and value.startswith("postgresql://"):
                assert urlparse(value).username != superuser, (name, key)
    assert "db.migrate_as_owner(admin)" in script and "db.migrate(" not in script
    assert re.search(r"db\.ensure_login\(conn, os\.environ\[\"CRM_LOADER_USER\"\].*member_of=\[db\.LOADER_ROLE\]", script,
                     re.S)
    assert 'erp.ensure_reader(conn, login=os.environ["ERP_DB_USER"]' in script


def test_landing_folder_is_a_volume_seeded_once_and_mounted_where_the_connection_says(compose, resolved):
    conn = _connection(resolved["airflow-worker"]["environment"], "spreadsheet_landing")
    assert conn["conn_type"] == "fs"
    path = conn["extra"]["path"]
    volume = _mounts(resolved["airflow-worker"])[path]
    assert volume in compose["volumes"]
    seed = resolved["crm-sync-seed"]
    seed_path = seed["environment"]["SPREADSHEET_LANDING"]
    assert _mounts(seed)[seed_path] == volume and not seed["volumes"][-1].endswith(":ro")
    assert "spreadsheet.write_landing(" in seed["command"][-1] and "iterdir()" in seed["command"][-1]
    init = resolved["airflow-init"]
    init_path = next(p for p, v in _mounts(init).items() if v == volume)
    script = init["command"][-1]
    # a new named volume is root's; the seed and the workers run as AIRFLOW_UID
    assert re.search(rf"chown -R .*{re.escape(init_path)}", script)
    # the workbooks are written by the seed and read by the workers: the image's build imports both sides
    assert "openpyxl" in _pins()
    built = " ".join(arg for instruction, arg in _dockerfile() if instruction == "RUN")
    assert "crm_sync.simulators.spreadsheet" in built and "crm_sync.sources.sheets" in built


@pytest.mark.integration
def test_the_seed_job_sets_up_roles_a_second_time_too(resolved, pg_admin_dsn, tmp_path):
    """The seed script itself, against a real PostgreSQL (twice: every `docker compose up` runs it)."""
    import subprocess
    import sys
    import uuid

    import psycopg2

    from crm_sync import db

    crm_db, finance_db = f"crm_test_{uuid.uuid4().hex[:10]}", f"crm_test_fin_{uuid.uuid4().hex[:8]}"
    db.ensure_database(pg_admin_dsn, crm_db)
    admin = db.with_database(pg_admin_dsn, crm_db)
    env = {**os.environ, **resolved["crm-sync-seed"]["environment"],
           "PYTHONPATH": str(ROOT / "plugins"), "CRM_SYNC_HOME": str(ROOT), "CRM_SYNC_DSN": admin,
           "CRM_LOADER_USER": f"{crm_db}_loader", "ERP_DB_USER": f"{crm_db}_erp_reader",
           "FINANCE_DB_NAME": finance_db, "FINANCE_DB_USER": f"{finance_db}_reader",
           "SPREADSHEET_LANDING": str(tmp_path)}
    try:
        for attempt in (1, 2):
            run = subprocess.run([sys.executable, "-c", resolved["crm-sync-seed"]["command"][-1]], env=env,
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            assert env["CRM_LOADER_PASSWORD"] not in run.stdout + run.stderr
        assert "already seeded" in run.stdout and "none pending" in run.stdout
        for user, password, dsn, query in (
                (env["CRM_LOADER_USER"], env["CRM_LOADER_PASSWORD"], admin, "select count(*) from sync.run_log"),
                (env["ERP_DB_USER"], env["ERP_DB_PASSWORD"], admin, "select count(*) from src_erp.customers"),
                (env["FINANCE_DB_USER"], env["FINANCE_DB_PASSWORD"], db.with_database(pg_admin_dsn, finance_db),
                 "select count(*) from cw.kh_zl")):
            conn = psycopg2.connect(dsn, user=user, password=password)
            try:
                with conn.cursor() as cur:
                    cur.execute("select rolsuper from pg_roles where rolname = current_user")
                    assert cur.fetchone()[0] is False, user
                    cur.execute(query)
            finally:
                conn.close()
    finally:
        from dagstack import drop_orphan_logins

        db.drop_database(pg_admin_dsn, crm_db)
        db.drop_database(pg_admin_dsn, finance_db)
        drop_orphan_logins(pg_admin_dsn)
