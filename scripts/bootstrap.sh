# Sourced by the other scripts: make sure .venv exists and matches pyproject.toml.
# Works on a fresh machine with only python3 (3.10-3.12); re-installs when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "setting up $VENV (first run takes a few minutes) ..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch==2.13.0 is pinned in pyproject.toml: it resolves to the CPU build, not a multi-GB CUDA one.
  # identity: dlib's face models for eval's identity distance (~30 s more on a fresh machine).
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,identity]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export GLOG_minloglevel="${GLOG_minloglevel:-2}"
