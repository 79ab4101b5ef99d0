-- Second database on the compose stack's PostgreSQL: the MLflow backend store (Airflow's metadata database
-- is POSTGRES_DB). The postgres image runs this once, with psql, when it initialises an empty data volume.
-- The password comes from MLFLOW_DB_PASSWORD in the container's environment (a dev placeholder by default).

\getenv mlflow_password MLFLOW_DB_PASSWORD
\if :{?mlflow_password}
\else
  \set mlflow_password mlflow
\endif

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
