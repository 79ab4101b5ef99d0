"""The local model server: variants behind one HTTP endpoint, dynamic batching, request log, admin API.

Nothing here imports Airflow. ``create_app`` lives in :mod:`airflow_llmops.serving.app` (FastAPI, torch);
operators import only :mod:`airflow_llmops.serving.client`, which needs nothing but ``httpx``.
"""
