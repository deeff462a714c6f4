#!/usr/bin/env bash
# Create .venv (once) and install vitkit with its test extras into it; re-run when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.vitkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing vitkit and its dependencies into .venv (first time: a few minutes) ..."
  log=.venv/install.log
  { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".[test]"; } >"$log" 2>&1 \
    || { grep -v '^WARNING: Location' "$log" | tail -30; echo "install failed: see $log" >&2; exit 1; }
  touch "$stamp"
fi
