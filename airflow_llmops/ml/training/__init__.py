"""The training job behind ``python -m airflow_llmops.ml.train``: data, models, progress, tracking and energy.

Nothing here imports Airflow: the same code runs under torchrun, in a cloud training container, or from a shell.
"""
