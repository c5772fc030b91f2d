"""Airflow DAG crm_sync__identity_estimate — the scheduled `crm-sync identity estimate` (crm_sync.dag_factory)."""
from crm_sync.dag_factory import build_estimate_dag

dag = build_estimate_dag()
