"""Run a real Airflow on one machine and drive it through its REST API (the demo and the system tests)."""
