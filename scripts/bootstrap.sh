# Sourced by scripts/demo and scripts/test: creates .venv and installs the project from the committed lock.
# Re-running is a no-op when pyproject.toml and the lock have not changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.llmops-install-stamp"
BOOTSTRAP_REV="2"  # bump to make existing .venvs redo the install steps below
# Every Airflow task, torchrun worker and server is a new Python process importing Airflow, MLflow or transformers:
# without cached bytecode each one compiles them again (3-4x slower imports), so let Python write .pyc files.
unset PYTHONDONTWRITEBYTECODE

_find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "error: Python 3.10-3.12 is required (3.11 recommended); set PYTHON=/path/to/python3.11" >&2
  return 1
}

_want_stamp() {
  { echo "$BOOTSTRAP_REV"; cat "$ROOT/pyproject.toml" "$ROOT/requirements/lock.txt"; } | sha256sum | cut -d' ' -f1
}

llmops_bootstrap() {
  local py want
  want="$(_want_stamp)"
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return 0
  fi
  py="$(_find_python)"
  if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  # torch first, with pip: it takes the CPU build (a local wheel, or LLMOPS_TORCH_INDEX such as
  # https://download.pytorch.org/whl/cpu); a resolver asked for plain torch fetches a multi-GB CUDA build.
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo ">> installing torch==$TORCH_VERSION (CPU) with pip"
    if [ -n "${LLMOPS_TORCH_INDEX:-}" ]; then
      "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" --index-url "$LLMOPS_TORCH_INDEX"
    else
      "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
    fi
  fi
  if [ ! -x "$VENV/bin/uv" ]; then
    "$VENV/bin/pip" install --quiet "uv>=0.5"
  fi
  echo ">> installing airflow-llmops[all,dev] from requirements/lock.txt with uv"
  VIRTUAL_ENV="$VENV" "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" \
    -c "$ROOT/requirements/lock.txt" -e "$ROOT[all,dev]"
  # uv installs without bytecode; compile it once here (about a minute) instead of in every process.
  echo ">> compiling bytecode"
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
  echo "$want" > "$STAMP"
}

# ---- Chromium for the LLMOps page's browser test (tests/e2e/test_ui_page.py) ----------------------------------------
# Playwright drives Debian's chromium (no browser download). Idempotent; installs only as root or with password-less
# sudo, otherwise says how. Runs only when scripts/test sources this file.
llmops_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || {
    echo ">> no chromium: the LLMOps page's browser test skips (fails under CI=true); install Chromium and set LLMOPS_CHROMIUM" >&2
    return 0
  }
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; else
      echo ">> no chromium: the LLMOps page's browser test skips (fails under CI=true); install it with: sudo apt-get install -y chromium" >&2
      return 0
    fi
  fi
  echo ">> installing chromium with apt-get (the LLMOps page's browser test)"
  $sudo apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 ||
    { $sudo apt-get update >/dev/null 2>&1 && $sudo apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; } ||
    echo ">> could not install chromium with apt-get; the browser test skips (fails under CI=true)" >&2
}
if [ "$(basename "${BASH_SOURCE[1]:-}")" = "test" ]; then
  llmops_chromium
fi
# ---- end of the Chromium step -----------------------------------------------------------------------------------------
