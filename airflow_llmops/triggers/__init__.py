"""Triggers: asynchronous waits that run in Airflow's triggerer while the worker slot is free."""
