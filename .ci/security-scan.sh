#!/usr/bin/env bash
# Security gate: bandit on the package source, then the secret scan against the committed baseline.
# Usage: bash .ci/security-scan.sh [ROOT]   (tools from PATH; `make security` puts .venv/bin first)
# Exits non-zero on any finding. Bandit reports medium and high severity (-ll); low-severity
# patterns (assert, subprocess import) are already covered by ruff's S rules with reviewed ignores.
set -euo pipefail

root="${1:-.}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"

if [[ ! -d "$root/src" ]]; then
    echo "security: no $root/src directory to scan" >&2
    exit 2
fi

status=0
echo "== bandit -r $root/src"
bandit -q -r "$root/src" -ll || status=1

echo "== secret scan"
"$python" "$here/secret_scan.py" --root "$root" || status=1

if [[ $status -ne 0 ]]; then
    echo "security: FAILED (see the findings above)" >&2
fi
exit "$status"
