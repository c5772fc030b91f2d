"""Airflow DAG crm_sync__erp — built from include/sources/erp.yaml by crm_sync.dag_factory."""
from crm_sync.dag_factory import build_dag

dag = build_dag("erp")
