"""Airflow DAG crm_sync__finance — built from include/sources/finance.yaml by crm_sync.dag_factory."""
from crm_sync.dag_factory import build_dag

dag = build_dag("finance")
