# Sourced by scripts/demo, scripts/test and scripts/bench: make sure .venv exists
# and holds this project (with the extras named in $CRAWLPROC_EXTRAS), then put
# it first on PATH. Reinstalls only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "crawlproc needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv ..." >&2
    "$PYTHON" -m venv .venv
fi
extras="${CRAWLPROC_EXTRAS:-}"
stamp=".venv/.crawlproc-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing crawlproc${extras:+[$extras]} into .venv ..." >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
    touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
