#!/usr/bin/env bash
# A tracking server on one machine with a PostgreSQL backend store and a local/S3 artifact root.
#   sudo apt-get install -y postgresql && sudo -u postgres createuser -P mlflow && sudo -u postgres createdb -O mlflow mlflow
#   pip install -e ".[cluster]"                           # the pinned PostgreSQL driver
#   bash cluster/mlflow/start_local_server.sh            # then: python tune.py --tracking-uri http://HOST:5000
# Tested as it stands by tests/test_postgres_stack.py (PostgreSQL 15, artifacts in a local folder, on loopback).
set -euo pipefail
DB_URI=${MLFLOW_DB_URI:-postgresql://mlflow:mlflow@localhost:5432/mlflow}
ARTIFACTS=${MLFLOW_ARTIFACTS:-s3://my-bucket/mlflow-artifacts}   # or a shared directory, e.g. /mnt/shared/mlflow
exec mlflow server --host "${HOST:-0.0.0.0}" --port "${PORT:-5000}" --backend-store-uri "$DB_URI" \
    --artifacts-destination "$ARTIFACTS" --serve-artifacts --workers "${WORKERS:-4}"
