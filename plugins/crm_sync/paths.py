"""Where crm-sync finds its files: the project root, `include/` and the local state folder `.local/`.

The package lives in `plugins/crm_sync/`, so the project root is two levels up. In the Docker
stack `plugins/` and `include/` are mounted side by side under `/opt/airflow`, which keeps the
same relation. `CRM_SYNC_HOME` overrides the root; `CRM_SYNC_INCLUDE_DIR` only the include folder
(tests point it at a copy with a broken source YAML).
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    env = os.environ.get("CRM_SYNC_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def include_dir() -> Path:
    env = os.environ.get("CRM_SYNC_INCLUDE_DIR")
    return Path(env).resolve() if env else project_root() / "include"


def sources_dir() -> Path:
    return include_dir() / "sources"


def sql_dir() -> Path:
    return include_dir() / "sql"


def expectations_dir() -> Path:
    return include_dir() / "expectations"


def local_dir() -> Path:
    path = project_root() / ".local"
    path.mkdir(parents=True, exist_ok=True)
    return path
