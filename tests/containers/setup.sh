#!/usr/bin/env bash
# Prepare this host for tests/containers and build the images, without any container registry.
#
#   bash tests/containers/setup.sh OUT_ENV_FILE
#
# 1. apt: podman, mmdebstrap, runc (when missing); pip: podman-compose (pinned in
#    deploy/constraints.txt) into the project's .venv (when missing).
# 2. Base image localhost/qgw-base:KEY = a Debian 12 minbase rootfs (python3, python3-venv,
#    ca-certificates, mosquitto, mosquitto-clients) made by mmdebstrap from the apt mirror in
#    /etc/apt/sources.list*, then `podman import`. KEY hashes the inputs; the rootfs tar is kept in
#    $QGW_CONTAINER_CACHE (default /var/cache/qgw-containers) and the image in podman's store, so a
#    second run on the same machine skips this step.
# 3. Host fix-ups, only when a probe container fails: `default_ulimits` (root without
#    CAP_SYS_RESOURCE cannot raise RLIMIT_NOFILE to podman's default) and runtime = "runc" (crun
#    refuses hybrid cgroups), both in a containers.conf given to podman by CONTAINERS_CONF.
# 4. A wheelhouse of the pinned dependencies made on the host (same Python 3.11 / glibc 2.36 as
#    the image), so that the image build needs no network (a TLS-intercepting proxy breaks pip
#    inside containers); then `podman build` of deploy/Containerfile (qgw) and
#    deploy/compose/mosquitto.Containerfile (the site brokers) FROM the local base.
#
# Writes KEY=VALUE lines (CONTAINERS_CONF, QGW_IMAGE, QGW_MQTT_IMAGE) to OUT_ENV_FILE for the test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:?usage: setup.sh OUT_ENV_FILE}"
CACHE="${QGW_CONTAINER_CACHE:-/var/cache/qgw-containers}"
# The project's venv (scripts/setup.sh makes it); the test passes its own interpreter.
PY="${QGW_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "setup[containers]: no $PY (run scripts/setup.sh)" >&2; exit 1; }
log() { echo "setup[containers] +${SECONDS}s: $*" >&2; }
die() { echo "setup[containers]: FAILED: $*" >&2; exit 1; }
mkdir -p "$CACHE"
: >"$OUT"

[ "$(id -u)" -eq 0 ] || die "needs root (rootful podman)"

# -- 1. tools --------------------------------------------------------------------------------
need_apt=()
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v mmdebstrap >/dev/null 2>&1 || need_apt+=(mmdebstrap)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
if [ "${#need_apt[@]}" -gt 0 ]; then
    log "apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >"$CACHE/apt.log" 2>&1 \
        || { cat "$CACHE/apt.log" >&2; die "apt-get install ${need_apt[*]}"; }
fi
if ! "$PY" -c "import podman_compose" >/dev/null 2>&1; then
    pc_pin="$(grep -E '^(podman-compose|PyYAML)==' "$ROOT/deploy/constraints.txt")"
    log "pip install $(echo $pc_pin)"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $pc_pin || die "pip install podman-compose"
fi
log "$(podman --version), $("$PY" -m podman_compose version 2>/dev/null | head -1)"

# -- 2. base image -------------------------------------------------------------------------
# The mirror apt uses: deb822 "URIs:" or a one-line "deb URL SUITE", first one serving bookworm.
mirror="$(
    { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'
    } | grep -E '/debian/?$' | head -1
)" || true
mirror="${mirror:-http://deb.debian.org/debian}"
packages="python3,python3-venv,ca-certificates,mosquitto,mosquitto-clients"
key="$(printf '%s\n' "bookworm" "$mirror" "$packages" "minbase" | sha256sum | cut -c1-12)"
base="localhost/qgw-base:$key"
if podman image exists "$base"; then
    log "base image $base (cached)"
else
    tar="$CACHE/rootfs-$key.tar"
    if [ ! -s "$tar" ]; then
        log "mmdebstrap bookworm from $mirror (packages: $packages)"
        rm -f "$tar.tmp"
        mmdebstrap --quiet --variant=minbase --include="$packages" --format=tar \
            bookworm "$tar.tmp" "$mirror" >"$CACHE/mmdebstrap.log" 2>&1 \
            || { tail -30 "$CACHE/mmdebstrap.log" >&2; die "mmdebstrap"; }
        mv "$tar.tmp" "$tar"
    fi
    log "podman import $tar as $base"
    podman import --change 'CMD ["/bin/bash"]' "$tar" "$base" >/dev/null || die "podman import"
fi

# -- 3. host fix-ups, only when needed -------------------------------------------------------
probe() { podman run --rm --network none "$base" /usr/bin/python3 -c 'print("ok")' 2>&1; }
if ! out="$(probe)"; then
    conf="$CACHE/containers.conf"
    log "probe container failed; applying host fix-ups in $conf: $out"
    {
        echo "[containers]"
        if echo "$out" | grep -qiE 'rlimit|ulimit|nofile|setrlimit'; then
            echo 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]'
        fi
        if echo "$out" | grep -qi 'hybrid'; then
            command -v runc >/dev/null 2>&1 || die "crun refuses hybrid cgroups and runc is missing"
            echo "[engine]"
            echo 'runtime = "runc"'
        fi
    } >"$conf"
    export CONTAINERS_CONF="$conf"
    out="$(probe)" || die "a container cannot run on this host even with $conf: $out"
    echo "CONTAINERS_CONF=$conf" >>"$OUT"
fi
log "probe container ran: $out"

# -- 4. wheelhouse and images ----------------------------------------------------------------
wkey="$(cat "$ROOT/deploy/constraints.txt" | sha256sum | cut -c1-12)"
wheels="$CACHE/wheels-$wkey"
if [ ! -d "$wheels" ]; then
    log "pip download the pinned dependencies into $wheels"
    rm -rf "$wheels.tmp"
    "$PY" -m pip download -q --only-binary=:all: -d "$wheels.tmp" -r "$ROOT/deploy/constraints.txt" 2>&1 \
        | { grep -v "^WARNING: Location" || true; } >&2 \
        || die "pip download (wheelhouse)"
    mv "$wheels.tmp" "$wheels"
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/deploy/wheelhouse"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/gateway" "$ROOT/keysource" "$ctx/"
cp "$ROOT/deploy/Containerfile" "$ROOT/deploy/constraints.txt" "$ctx/deploy/"
cp "$wheels"/* "$ctx/deploy/wheelhouse/"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
image="localhost/qgw:ci-$key"
log "podman build deploy/Containerfile -> $image"
podman build --quiet --format docker -f "$ctx/deploy/Containerfile" --build-arg BASE="$base" \
    --build-arg PIP_NO_INDEX=1 -t "$image" "$ctx" >"$CACHE/build-qgw.log" 2>&1 \
    || { tail -40 "$CACHE/build-qgw.log" >&2; die "podman build deploy/Containerfile"; }
mqtt_image="localhost/qgw-mosquitto:$key"
log "podman build deploy/compose/mosquitto.Containerfile -> $mqtt_image"
podman build --quiet --format docker -f "$ROOT/deploy/compose/mosquitto.Containerfile" --build-arg BASE="$base" \
    -t "$mqtt_image" "$ROOT/deploy/compose" >"$CACHE/build-mosquitto.log" 2>&1 \
    || { tail -40 "$CACHE/build-mosquitto.log" >&2; die "podman build mosquitto.Containerfile"; }
echo "QGW_IMAGE=$image" >>"$OUT"
echo "QGW_MQTT_IMAGE=$mqtt_image" >>"$OUT"
# the builds leave their intermediate (build-stage) images behind: drop the dangling ones
podman image prune -f >/dev/null 2>&1 || true
log "ready"
