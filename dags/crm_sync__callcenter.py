"""Airflow DAG crm_sync__callcenter — built from include/sources/callcenter.yaml by crm_sync.dag_factory."""
from crm_sync.dag_factory import build_dag

dag = build_dag("callcenter")
