#!/usr/bin/env bash
# Installs lutra's dependencies on a Debian machine. Idempotent: a second run
# only checks what is there (a few seconds).
#
#   bash cmake/setup.sh [--arch aarch64] [--prefix DIR]
#
# - Catch2 v3, Google Benchmark, cmake, ninja and a C++17 compiler from Debian.
#   Debian 12 has Catch2 v3 only in its backports suite.
# - Highway >= 1.2. The system libhwy-dev is used when new enough (Debian 13).
#   Otherwise (Debian 12 ships 1.0.3) Debian's own `highway` source package is
#   fetched from the next Debian suite with `apt-get source` and only its core
#   library is built into DIR (default build/deps/hwy-<arch>).
# - --arch aarch64 on an x86 host: Debian's g++-aarch64-linux-gnu and qemu-user,
#   Catch2 v3 for arm64 unpacked into build/deps/catch2-aarch64 (printed as
#   `LUTRA_CATCH2_PREFIX=<dir>`), and Highway cross-built with
#   cmake/aarch64-linux-gnu.cmake. cmake/test-aarch64.sh uses all of it.
# Extra apt sources are derived from the machine's configured Debian sources:
# no package host name is written anywhere.
#
# Prints `LUTRA_HWY_PREFIX=<dir>` (empty for the system Highway) as last line.
set -euo pipefail

ARCH=$(uname -m)
PREFIX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    *) echo "setup.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -n "$PREFIX" ] || PREFIX="$ROOT/build/deps/hwy-$ARCH"
HWY_VERSION_MIN=1.2.0

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
log() { echo "[setup] $*" >&2; }

# --- apt sources --------------------------------------------------------------
# The URI of the main Debian archive as this machine already has it configured.
debian_uri() {
  local uri=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    uri=$(awk '/^URIs:/{for(i=2;i<=NF;i++) print $i}' /etc/apt/sources.list.d/*.sources |
          grep -v -e security -e '^$' | grep -i debian | head -n1 || true)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /:\/\//) {print $i; exit}}' \
          /etc/apt/sources.list | head -n1 || true)
  fi
  echo "$uri"
}
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
NEXT_SUITE=""
case "$CODENAME" in
  bookworm) NEXT_SUITE=trixie ;;
esac
EXTRA=/etc/apt/sources.list.d/lutra-extra.sources
APT_UPDATED=0
apt_update() { if [ $APT_UPDATED = 0 ]; then $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq; APT_UPDATED=1; fi; }
ensure_extra_sources() {
  [ "$CODENAME" = bookworm ] || return 0
  [ -f "$EXTRA" ] && return 0
  local uri; uri=$(debian_uri)
  if [ -z "$uri" ]; then
    log "cannot find a configured Debian archive URI in /etc/apt; add bookworm-backports and deb-src $NEXT_SUITE yourself"
    exit 1
  fi
  log "adding bookworm-backports and deb-src $NEXT_SUITE from the configured archive"
  $SUDO tee "$EXTRA" >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: $uri
Suites: $NEXT_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  APT_UPDATED=0
}

pkg_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '/install ok installed/{print $4}'; }
need_install() {  # name [minversion]
  local v; v=$(pkg_version "$1")
  [ -z "$v" ] && return 0
  [ -n "${2:-}" ] && ! dpkg --compare-versions "$v" ge "$2" && return 0
  return 1
}

# --- Debian packages ------------------------------------------------------------
PKGS=()
for p in cmake ninja-build g++ make libbenchmark-dev dpkg-dev; do
  need_install "$p" && PKGS+=("$p")
done
# Cross builds (--arch aarch64 on an x86 host): Debian's cross compiler, and
# qemu user-mode emulation to run the tests (see cmake/test-aarch64.sh).
CROSS=""
if [ "$ARCH" != "$(uname -m)" ]; then
  case "$ARCH" in
    aarch64) CROSS=aarch64-linux-gnu; DEB_ARCH=arm64 ;;
    *) log "no cross toolchain known for --arch $ARCH (supported: aarch64)"; exit 2 ;;
  esac
  need_install "g++-$CROSS" && PKGS+=("g++-$CROSS")
  if ! command -v "qemu-$ARCH" >/dev/null && ! command -v "qemu-$ARCH-static" >/dev/null; then
    PKGS+=(qemu-user)
  fi
fi
CATCH_PKG=""
if need_install libcatch2-dev 3.0; then CATCH_PKG=libcatch2-dev; fi
if [ ${#PKGS[@]} -gt 0 ] || [ -n "$CATCH_PKG" ]; then
  ensure_extra_sources
  apt_update
  if [ ${#PKGS[@]} -gt 0 ]; then
    log "installing ${PKGS[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${PKGS[@]}" >/dev/null
  fi
  if [ -n "$CATCH_PKG" ]; then
    cand=$(apt-cache policy libcatch2-dev | awk '/Candidate:/{print $2}')
    if [ "$CODENAME" = bookworm ]; then
      log "installing libcatch2-dev (v3) from bookworm-backports"
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq -t bookworm-backports libcatch2-dev >/dev/null
    elif dpkg --compare-versions "${cand:-0}" ge 3.0; then
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq libcatch2-dev >/dev/null
    else
      log "no Catch2 v3 package found (candidate: ${cand:-none})"; exit 1
    fi
  fi
fi

# --- Catch2 v3 for a cross target ---------------------------------------------
# Debian's libcatch2-dev cannot be installed for two architectures at once (it
# is not Multi-Arch), so the target's .deb is fetched with a private apt state
# under build/deps/apt-<arch> (the system's dpkg architectures and apt lists
# stay untouched) and unpacked into build/deps/catch2-<arch>. CMake finds it
# through CMAKE_FIND_ROOT_PATH (cmake/<arch>-linux-gnu.cmake).
CATCH2_PREFIX=""
if [ -n "$CROSS" ]; then
  CATCH2_PREFIX="$ROOT/build/deps/catch2-$ARCH"
  if [ ! -f "$CATCH2_PREFIX/usr/lib/cmake/Catch2/Catch2Config.cmake" ]; then
    uri=$(debian_uri)
    [ -n "$uri" ] || { log "cannot find a configured Debian archive URI in /etc/apt"; exit 1; }
    suite=$CODENAME
    [ "$CODENAME" = bookworm ] && suite=bookworm-backports  # Catch2 v3 lives there
    A="$ROOT/build/deps/apt-$ARCH"
    rm -rf "$A" "$CATCH2_PREFIX"
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/etc/parts"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    opts="arch=$DEB_ARCH"
    [ -f "$keyring" ] && opts="$opts signed-by=$keyring"
    echo "deb [$opts] $uri $suite main" > "$A/etc/sources.list"
    APT_X=(-o "APT::Architecture=$DEB_ARCH" -o "APT::Architectures::=$DEB_ARCH"
           -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache"
           -o "Dir::Etc::SourceList=$A/etc/sources.list" -o "Dir::Etc::SourceParts=$A/etc/parts"
           -o Dir::State::status=/dev/null -o APT::Sandbox::User=root)
    log "fetching libcatch2-dev:$DEB_ARCH from $suite into $CATCH2_PREFIX"
    apt-get "${APT_X[@]}" update -qq
    (cd "$A" && apt-get "${APT_X[@]}" download -qq libcatch2-dev >/dev/null)
    ver=$(dpkg-deb -f "$A"/libcatch2-dev_*_"$DEB_ARCH".deb Version)
    if ! dpkg --compare-versions "$ver" ge 3.0; then
      log "libcatch2-dev:$DEB_ARCH in $suite is $ver, need >= 3.0"; exit 1
    fi
    dpkg-deb -x "$A"/libcatch2-dev_*_"$DEB_ARCH".deb "$CATCH2_PREFIX"
  fi
  echo "LUTRA_CATCH2_PREFIX=$CATCH2_PREFIX"
fi

# --- Highway ------------------------------------------------------------------
HWY_PREFIX=""
if [ "$ARCH" = "$(uname -m)" ] && ! need_install libhwy-dev "$HWY_VERSION_MIN"; then
  log "system Highway $(pkg_version libhwy-dev) is new enough"
else
  sys_cand=""
  if [ "$ARCH" = "$(uname -m)" ] && [ ! -f "$PREFIX/lib/cmake/hwy/hwy-config.cmake" ]; then
    apt_update
    sys_cand=$(apt-cache policy libhwy-dev | awk '/Candidate:/{print $2}')
  fi
  if [ -n "$sys_cand" ] && [ "$sys_cand" != "(none)" ] && dpkg --compare-versions "$sys_cand" ge "$HWY_VERSION_MIN"; then
    log "installing system libhwy-dev $sys_cand"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq libhwy-dev >/dev/null
  elif [ -f "$PREFIX/lib/cmake/hwy/hwy-config.cmake" ]; then
    log "Highway already built in $PREFIX"
    HWY_PREFIX="$PREFIX"
  else
    ensure_extra_sources
    apt_update
    SRC="$ROOT/build/deps/src"
    mkdir -p "$SRC"
    if [ ! -d "$SRC/highway/hwy" ]; then
      log "fetching Debian's highway source package"
      (cd "$SRC" && rm -rf highway highway_* &&
       apt-get source --download-only highway >/dev/null 2>&1 &&
       dpkg-source -x highway_*.dsc highway >/dev/null)
    fi
    ver=$(sed -n 's/^Version: //p' "$SRC"/highway_*.dsc | head -n1)
    if ! dpkg --compare-versions "${ver%-*}" ge "$HWY_VERSION_MIN"; then
      log "Debian's highway source package is $ver, need >= $HWY_VERSION_MIN"; exit 1
    fi
    log "building Highway $ver core library for $ARCH into $PREFIX"
    extra=()
    if [ "$ARCH" != "$(uname -m)" ]; then
      extra+=("-DCMAKE_TOOLCHAIN_FILE=$ROOT/cmake/$ARCH-linux-gnu.cmake")
    fi
    cmake -S "$SRC/highway" -B "$ROOT/build/deps/hwy-build-$ARCH" -G Ninja \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$PREFIX" \
      -DHWY_ENABLE_CONTRIB=OFF -DHWY_ENABLE_EXAMPLES=OFF -DHWY_ENABLE_TESTS=OFF \
      -DBUILD_TESTING=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
      "${extra[@]}" >/dev/null
    cmake --build "$ROOT/build/deps/hwy-build-$ARCH" --target install >/dev/null
    HWY_PREFIX="$PREFIX"
  fi
fi
echo "LUTRA_HWY_PREFIX=$HWY_PREFIX"
