# Shared by .ci/run and the Makefile: one virtualenv per pyproject.toml hash, outside the clone.
seqep_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SEQEP_DATA_DIR="${SEQEP_DATA_DIR:-$seqep_root/../shared/data}"
hash="$(cat "$seqep_root/pyproject.toml" "$seqep_root/.ci/env.sh" | sha256sum | cut -c1-12)"
export SEQEP_VENV="${SEQEP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/seqep/venv-$hash}"

seqep_ensure_venv() {
  if [ ! -x "$SEQEP_VENV/bin/seqep" ] || [ ! -f "$SEQEP_VENV/.complete" ]; then
    echo "creating virtualenv $SEQEP_VENV (first run only)"
    rm -rf "$SEQEP_VENV"
    python3 -m venv "$SEQEP_VENV"
    "$SEQEP_VENV/bin/pip" install -q --upgrade pip
    # torch first, pinned to the CPU build on local disk, so nothing resolves to a CUDA wheel.
    "$SEQEP_VENV/bin/pip" install -q "torch==2.13.0"
    "$SEQEP_VENV/bin/pip" install -q "norse>=1.1" --no-deps
    "$SEQEP_VENV/bin/pip" install -q -e "$seqep_root[test]"
    touch "$SEQEP_VENV/.complete"
  fi
  # editable install points at whichever clone created the venv: re-point it at this one (cheap).
  # (asked from / so the current directory cannot answer for the installed package, as it would with python -c)
  if ! (cd / && "$SEQEP_VENV/bin/python" -c "import analog_ep,sys,os; sys.exit(0 if os.path.dirname(os.path.dirname(analog_ep.__file__))=='$seqep_root' else 1)") 2>/dev/null; then
    "$SEQEP_VENV/bin/pip" install -q --no-deps -e "$seqep_root"
  fi
  export PATH="$SEQEP_VENV/bin:$PATH"
}
