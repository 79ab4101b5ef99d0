"""Airflow plugins of airflow-llmops (registered through the ``airflow.plugins`` entry point)."""
