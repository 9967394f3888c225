#!/usr/bin/env bash
# parvisor set-up: ./setup.sh demo | test [--slow] | install
#   install  apt packages + .venv with parvisor (idempotent, fast when done)
#   demo     install, start the host service in the background, build the tiny guest,
#            create and boot the VM "demo", show it running
#   test     install, run the test suite (--slow adds the soak / fault-matrix tier)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PARVISOR=$VENV/bin/parvisor
APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio qemu-guest-agent xz-utils zstd
              kmod iproute2 python3-venv dnsmasq-base nftables
              ovmf swtpm swtpm-tools grub-pc-bin grub-efi-amd64-bin dosfstools mtools fdisk
              xorriso etcd-server etcd-client
              chromium)   # chromium: the web console's browser tests (Playwright)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup.sh needs root (it installs Debian packages and runs QEMU)" >&2; exit 1
  fi
}

install_apt() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
  # The tiny-image builder downloads .debs with apt-get download: it needs package lists.
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
    apt-get update -q >/dev/null
  fi
}

pick_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "parvisor needs Python >= 3.11" >&2; exit 1
}

install_venv() {
  local stamp=$VENV/.parvisor-installed
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  say "creating the virtualenv at .venv"
  [ -x "$VENV/bin/python" ] || "$(pick_python)" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e ".[test]"
  echo "$want" > "$stamp"
}

install_user() {
  # QEMU drops to this unprivileged user after start-up (host config: qemu_user).
  if ! id parvisor-qemu >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin parvisor-qemu
  fi
  if getent group kvm >/dev/null; then usermod -a -G kvm parvisor-qemu; fi
}

install_web() {
  # The web console's front-end assets (xterm.js) come from npm, served locally by the
  # host service: no CDN at run time. Skipped when package-lock.json is unchanged.
  local stamp=web/node_modules/.parvisor-installed want
  want=$(sha256sum web/package-lock.json | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
  if ! command -v npm >/dev/null; then
    say "installing Debian packages: nodejs npm"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null
  fi
  say "installing the web console's assets (npm ci in web/)"
  (cd web && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$want" > "$stamp"
}

install_all() {
  need_root
  install_apt
  install_venv
  install_web
  install_user
}

state_dir() { echo "${PARVISOR_STATE_DIR:-/var/lib/parvisor}"; }

service_up() { "$PARVISOR" host info >/dev/null 2>&1; }

start_service() {
  local dir log
  dir=$(state_dir); mkdir -p "$dir/logs"; log=$dir/logs/service.log
  if service_up; then say "host service already running"; return; fi
  say "starting the host service (log: $log)"
  setsid nohup "$PARVISOR" host serve >>"$log" 2>&1 < /dev/null &
  echo $! > "$dir/service.pid"
  for _ in $(seq 1 100); do
    service_up && return
    kill -0 "$(cat "$dir/service.pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "the host service did not come up; see $log" >&2; tail -20 "$log" >&2; exit 1
}

demo() {
  install_all
  export PARVISOR_STATE_DIR; PARVISOR_STATE_DIR=$(state_dir)
  start_service
  "$PARVISOR" host info
  say "building the tiny guest image (cached after the first time)"
  "$PARVISOR" image build-tiny
  if ! "$PARVISOR" vm show demo >/dev/null 2>&1; then
    "$PARVISOR" vm create demo --image tiny --cpus 1 --memory 256M \
      --notes "created by ./setup.sh demo"
  fi
  case "$("$PARVISOR" vm show demo --json | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["state"])')" in
    running) ;;
    paused) "$PARVISOR" vm resume demo ;;
    *) "$PARVISOR" vm start demo ;;
  esac
  say "waiting for the guest agent"
  for _ in $(seq 1 120); do
    "$PARVISOR" vm exec demo --timeout 5 -- true >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$PARVISOR" vm show demo
  say "a command run inside the guest: uname -a"
  "$PARVISOR" vm exec demo -- uname -a
  cat <<EOT

The host service and the VM "demo" keep running. Try:
  .venv/bin/parvisor vm list
  .venv/bin/parvisor vm exec demo -- cat /proc/cpuinfo
  .venv/bin/parvisor vm console demo          (Ctrl-] detaches)
  .venv/bin/parvisor vm save demo && .venv/bin/parvisor vm start demo
  .venv/bin/parvisor events
Stop them:
  .venv/bin/parvisor vm shutdown demo
  kill \$(cat $(state_dir)/service.pid)        (VMs keep running without the service)
State lives in $(state_dir) (PARVISOR_STATE_DIR moves it).
EOT
}

run_tests() {
  install_all
  local args=(-q -p no:cacheprovider --durations=25)   # the slowest tests, for the CI budget
  if [ "${1:-}" = "--slow" ]; then args+=(-m "slow or not slow"); else args+=(-m "not slow"); fi
  say "running the tests"
  set +e
  "$VENV/bin/pytest" "${args[@]}" tests
  local rc=$?
  set -e
  [ $rc = 5 ] && { echo "no tests were collected" >&2; exit 1; }
  exit $rc
}

case "${1:-}" in
  install) install_all ;;
  demo) demo ;;
  test) shift; run_tests "$@" ;;
  *) echo "usage: ./setup.sh demo | test [--slow] | install" >&2; exit 2 ;;
esac
