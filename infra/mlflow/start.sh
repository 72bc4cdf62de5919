#!/usr/bin/env bash
# Start the MLflow tracking server on the Ray head node (cluster.yaml runs this after `ray start`).
#   Backend store: SQLite on the head's disk (or MLFLOW_BACKEND_STORE_URI, e.g. a postgresql:// RDS URI).
#   Artifacts: MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix), proxied by the server, so that
#   workers need no S3 credentials of their own for MLflow and clients use one URI.
# It listens on 0.0.0.0:5000 inside the cluster's security group, which admits no outside traffic;
# open the UI through `ray attach cluster.yaml -p 5000`. Jobs use MLFLOW_TRACKING_URI=http://<head>:5000.
set -euo pipefail
source ~/llava-platform-infra/mlflow/mlflow.env 2>/dev/null || true
STORE="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$HOME/mlflow/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$HOME/mlflow/artifacts}"
mkdir -p "$HOME/mlflow"
if pgrep -f "mlflow server" >/dev/null; then
  echo "mlflow server already running"; exit 0
fi
nohup python3 -m mlflow server --host 0.0.0.0 --port 5000 \
  --backend-store-uri "$STORE" --artifacts-destination "$ARTIFACTS" --workers 2 \
  > "$HOME/mlflow/server.log" 2>&1 &
echo "mlflow server started: store $STORE, artifacts $ARTIFACTS, log ~/mlflow/server.log"
