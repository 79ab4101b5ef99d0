"""Extra links shown on our task instances in the Airflow UI."""
