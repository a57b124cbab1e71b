#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf code from src/swarmlearn/proto/*.proto.
set -euo pipefail
python="$(realpath "${1:-.venv}")/bin/python"
cd "$(dirname "$0")/../src"
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. swarmlearn/proto/*.proto
# A .proto that declares no service (etcd_kv.proto: messages only) gets an empty *_pb2_grpc.py; drop it.
for proto in swarmlearn/proto/*.proto; do
  grep -q '^service ' "$proto" || rm -f "${proto%.proto}_pb2_grpc.py"
done
