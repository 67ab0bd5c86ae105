#!/usr/bin/env bash
# Lint the Docker files and check the build context; needs no Docker engine.
#   bash docker/check.sh
# hadolint on both Dockerfiles, shellcheck on entrypoint.sh and this script,
# then docker/check_context.py. Python: $PYTHON, else .venv/bin/python, else
# python3. A linter found neither next to that Python nor on PATH is SKIPPED
# (requirements/test.lock.txt installs both); any finding fails the script.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
bindir="$(dirname "$("$py" -c 'import sys; print(sys.executable)')")"
status=0

lint() {  # lint TOOL FILE...
  local tool=$1 exe
  shift
  if [[ -x "$bindir/$tool" ]]; then
    exe="$bindir/$tool"
  elif ! exe="$(command -v "$tool")"; then
    echo "SKIPPED $tool: not found in $bindir or on PATH (pip install -r requirements/test.lock.txt)"
    return 0
  fi
  echo "== $tool $*"
  if "$exe" "$@"; then
    echo "OK   $tool"
  else
    echo "FAIL $tool"
    status=1
  fi
}

lint hadolint docker/Dockerfile.rocm docker/Dockerfile.cuda
lint shellcheck docker/entrypoint.sh docker/check.sh
echo "== $py docker/check_context.py"
"$py" docker/check_context.py || status=1
exit "$status"
