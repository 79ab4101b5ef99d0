"""The ML core: data, training, quantization, evaluation and drift. It never imports Airflow."""
