#!/usr/bin/env bash
# Regenerates the type stubs of the native module with nanobind's stubgen, from the fastdcp
# installed in .venv (scripts/python_env.sh builds it; rebuild after changing the bindings):
# python/fastdcp/_C.pyi, and python/fastdcp/errors.pyi, where the exception types that
# bindings.cpp makes are declared (their home module; _C.pyi imports them from there). With
# --check, changes nothing and fails when the checked-in stubs differ (CI: scripts/test.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
generated="$(mktemp -d)"
trap 'rm -rf "$generated"' EXIT
status=0
for module in _C errors; do
  stubs="$root/python/fastdcp/$module.pyi"
  # Run outside the source tree, so that the installed package is the one imported.
  (cd "$generated" && "$root/.venv/bin/python" -m nanobind.stubgen -q -m "fastdcp.$module" -o "$generated/$module.pyi")
  if [ "${1:-}" != "--check" ]; then
    cp "$generated/$module.pyi" "$stubs"
  elif ! diff -u "$stubs" "$generated/$module.pyi"; then
    echo "python/fastdcp/$module.pyi does not match the bindings; refresh the stubs with: bash scripts/update_stubs.sh" >&2
    status=1
  fi
done
exit $status
