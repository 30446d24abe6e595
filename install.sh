#!/usr/bin/env bash
# Create .venv and install histoindex with its test extras, from scratch.
# Uses uv when it can (seconds) and falls back to pip; honours a local wheel folder configured for pip.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
EXTRAS=${HISTOINDEX_EXTRAS:-test}  # CI adds dev (ruff, import-linter)
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade uv >/dev/null 2>&1 || true
links=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)
if [ -x .venv/bin/uv ]; then
  args=()
  for d in $links; do args+=(--find-links "$d"); done
  .venv/bin/uv pip install -q --python .venv/bin/python "${args[@]}" -c constraints.txt -e ".[$EXTRAS]"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
fi
echo "installed: $(.venv/bin/histoindex --version)"
