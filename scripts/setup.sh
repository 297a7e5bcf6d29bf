#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: system packages, a venv, the project with [dev].
# Used by `make demo`, `make test` and .ci/run. Installs only from Debian and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# make bench: the C load generator (bench/loadgen.c) and the mosquitto command-line clients
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
[ -f /usr/include/mosquitto.h ] || need_apt+=(libmosquitto-dev)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# promtool checks deploy/prometheus/ in the tests (Debian ships it in the prometheus package).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# setpriv drops CAP_DAC_OVERRIDE in the credential tests (util-linux, normally present).
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
# sslpsk3, a C extension pulled by the dev-only interop client skip-qkd, builds from source
if command -v dpkg >/dev/null 2>&1; then
    command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
    for pkg in libssl-dev python3-dev; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
    done
fi
# formal/spin/epochs.pml is model-checked in the tests (its verifier is compiled with gcc above)
command -v spin >/dev/null 2>&1 || need_apt+=(spin)
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: please install: ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
    echo "setup: apt-get install ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
stamp=.venv/.qgw-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ deploy/constraints.txt -nt "$stamp" ]; then
    # deploy/constraints.txt pins the runtime dependencies, the same versions as the container image
    echo "setup: installing qgw[dev] into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! .venv/bin/python -m pip install -q -c deploy/constraints.txt -e ".[dev,oqs]" >.venv/pip-install.log 2>&1; then
        cat .venv/pip-install.log >&2
        exit 1
    fi
    .venv/bin/python -c "import gateway, cryptography, mqtt5, aiohttp, pydantic_settings, numpy"
    touch "$stamp"
fi
