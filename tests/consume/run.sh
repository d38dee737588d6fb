#!/usr/bin/env bash
# Consumption tests: lutra used the ways its users use it.
#  (a) cmake --install to a temporary prefix, then find_package(lutra CONFIG)
#  (b) the source tree vendored with add_subdirectory
#   bash tests/consume/run.sh [HWY_PREFIX]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HWY_PREFIX=${1:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# (a) install, then find_package
cmake -S "$ROOT" -B "$WORK/lutra-build" -G Ninja -DLUTRA_BUILD_TESTS=OFF \
  -DLUTRA_BUILD_BENCH=OFF -DLUTRA_BUILD_EXAMPLES=OFF -DLUTRA_INSTALL=ON \
  ${HWY_PREFIX:+-DCMAKE_PREFIX_PATH="$HWY_PREFIX"} >/dev/null
cmake --install "$WORK/lutra-build" --prefix "$WORK/prefix" >/dev/null
cmake -S "$ROOT/tests/consume/find_package" -B "$WORK/fp" -G Ninja \
  -DCMAKE_PREFIX_PATH="$WORK/prefix${HWY_PREFIX:+;$HWY_PREFIX}" >/dev/null
cmake --build "$WORK/fp" >/dev/null
"$WORK/fp/consumer"

# (b) add_subdirectory
cmake -S "$ROOT/tests/consume/subdirectory" -B "$WORK/sub" -G Ninja \
  -DLUTRA_SOURCE_DIR="$ROOT" ${HWY_PREFIX:+-DCMAKE_PREFIX_PATH="$HWY_PREFIX"} >/dev/null
cmake --build "$WORK/sub" >/dev/null
"$WORK/sub/consumer"
echo "consume: 2 passed, 0 failed"
