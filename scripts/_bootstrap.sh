# Shared by scripts/test, scripts/quickstart and scripts/bench: install the system
# packages Loft needs (as root, on Debian) and a virtualenv in .venv with Loft in it.
# Sourced, not run. Idempotent: a second run installs nothing new.

loft_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

loft_apt_install() {
    # Installs the Debian packages named in "$@" that are not installed yet.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "loft: need these Debian packages, run as root or install them: ${missing[*]}" >&2
        return 1
    fi
    echo "loft: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

loft_python() {
    # Prints a Python >= 3.11 interpreter, installing Debian's if there is none.
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 \
            && "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"; return 0
        fi
    done
    loft_apt_install python3 python3-venv python3-dev >&2 || return 1
    command -v python3
}

loft_venv() {
    # Makes .venv with Loft installed (editable) and the extras named in $1.
    local extras=${1:-}
    loft_apt_install fuse3 libfuse3-dev pkg-config gcc libc6-dev sqlite3 || return 1
    local py; py=$(loft_python) || return 1
    if ! "$py" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        loft_apt_install python3-dev || return 1
    fi
    local venv="$loft_root/.venv"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" || return 1
    local stamp="$venv/.loft-installed$extras"
    if [ ! -f "$stamp" ] || [ "$loft_root/pyproject.toml" -nt "$stamp" ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            -e "$loft_root${extras:+[$extras]}" || return 1
        touch "$stamp"
    fi
}
