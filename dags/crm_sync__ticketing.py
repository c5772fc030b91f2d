"""Airflow DAG crm_sync__ticketing — built from include/sources/ticketing.yaml by crm_sync.dag_factory."""
from crm_sync.dag_factory import build_dag

dag = build_dag("ticketing")
