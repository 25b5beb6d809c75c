# Sourced by scripts/ctxfs and scripts/test: (re)build .venv from pyproject.toml
# when it is missing or older than pyproject.toml. $1 is the pip extra ("" or "test").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extra="${1:-}"
stamp="$venv/.installed${extra:+-$extra}"
# The test extra is a superset: a venv built for the tests serves the
# plain commands too (no second install, e.g. scripts/ctxfs run by a test).
if [ -z "$extra" ] && [ -f "$venv/.installed-test" ] && [ ! "$root/pyproject.toml" -nt "$venv/.installed-test" ]; then
    stamp="$venv/.installed-test"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    python="${PYTHON:-python3}"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "ctxfs needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2; exit 1; }
    echo "ctxfs: building $venv (once) ..." >&2
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    log="$venv/install.log"
    if ! { "$venv/bin/python" -m pip install --upgrade pip \
           && "$venv/bin/python" -m pip install -e "$root${extra:+[$extra]}"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "ctxfs: installing into $venv failed; full log in $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
