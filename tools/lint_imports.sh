#!/usr/bin/env bash
# Check the import layers (pyproject.toml [tool.importlinter]) on the installed layout.
# The role folders (edge_runtime/, export/, ...) are mapped into the flexsfl namespace by
# setuptools' package-dir, which import-linter's scanner cannot follow in the source tree; so we
# install the package, as a wheel would, into a scratch folder and lint that.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(realpath -s "${PYTHON:-.venv/bin/python}")
out=$(mktemp -d "${TMPDIR:-/tmp}/flexsfl-layers.XXXXXX")
trap 'rm -rf "$out"' EXIT
"$py" -m pip install -q --no-deps --no-build-isolation --target "$out" . >/dev/null 2>&1 || {
  echo "lint-imports: could not install the package into $out; run: $py -m pip install --no-deps --no-build-isolation --target $out ." >&2
  exit 2
}
rm -rf build ./*.egg-info
cd "$out"
PYTHONPATH="$out" "$(dirname "$py")/lint-imports" --config "$OLDPWD/pyproject.toml" "$@"
