"""Airflow DAG crm_sync__spreadsheet — built from include/sources/spreadsheet.yaml by crm_sync.dag_factory."""
from crm_sync.dag_factory import build_dag

dag = build_dag("spreadsheet")
