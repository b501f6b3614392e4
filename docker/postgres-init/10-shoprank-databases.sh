#!/bin/bash
# PostgreSQL first-start init (mounted into /docker-entrypoint-initdb.d by docker-compose.yml):
# one database and one login role each for Airflow's and MLflow's metadata, and MLflow's
# users/permissions database (basic auth, owned by the same role). The entrypoint
# runs this only when the data volume is empty. A shell script rather than plain .sql
# because the role passwords come from the environment (.env), never from this file.
set -eo pipefail

: "${SHOPRANK_AIRFLOW_DB_PASSWORD:?SHOPRANK_AIRFLOW_DB_PASSWORD is not set}"
: "${SHOPRANK_MLFLOW_DB_PASSWORD:?SHOPRANK_MLFLOW_DB_PASSWORD is not set}"

# psql variables (:'name') quote the passwords as SQL literals.
psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v airflow_password="${SHOPRANK_AIRFLOW_DB_PASSWORD}" \
    -v mlflow_password="${SHOPRANK_MLFLOW_DB_PASSWORD}" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
