#!/usr/bin/env bash
# Workflow gate: actionlint checks (jactionlint: actionlint's checks plus security and policy rules,
# with shellcheck on every `run:` script), shellcheck on the CI shell scripts, and the JSON schemas
# of GitHub workflows, composite actions and Dependabot (vendored by check-jsonschema: offline).
# Usage: bash .ci/lint-workflows.sh [ROOT]   (tools from PATH; `make workflows-lint` puts .venv/bin first)
set -euo pipefail

root="${1:-.}"
cd "$root"

shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
actions=(.github/actions/*/action.yml .github/actions/*/action.yaml)
scripts=(.ci/*.sh)
[[ -f .ci/run ]] && scripts=(.ci/run "${scripts[@]}")
shopt -u nullglob

if [[ ${#workflows[@]} -eq 0 ]]; then
    echo "workflows-lint: no workflow files under $root/.github/workflows" >&2
    exit 2
fi

status=0
echo "== jactionlint (${#workflows[@]} workflows, ${#actions[@]} composite actions)"
jactionlint --no-color --no-online "${workflows[@]}" "${actions[@]}" || status=1

if [[ ${#scripts[@]} -gt 0 ]]; then
    echo "== shellcheck ${scripts[*]}"
    shellcheck --severity=style "${scripts[@]}" || status=1
fi

echo "== check-jsonschema (github-workflows, github-actions, dependabot)"
check-jsonschema --builtin-schema vendor.github-workflows "${workflows[@]}" || status=1
if [[ ${#actions[@]} -gt 0 ]]; then
    check-jsonschema --builtin-schema vendor.github-actions "${actions[@]}" || status=1
fi
if [[ -f .github/dependabot.yml ]]; then
    check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml || status=1
fi

if [[ $status -ne 0 ]]; then
    echo "workflows-lint: FAILED (see the findings above)" >&2
fi
exit "$status"
