"""Airflow DAG crm_sync__im — built from include/sources/im.yaml by crm_sync.dag_factory."""
from crm_sync.dag_factory import build_dag

dag = build_dag("im")
