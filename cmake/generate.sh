#!/usr/bin/env bash
# Main job: installs dependencies, builds lutra-generate and generates text.
#   bash cmake/generate.sh [lutra-generate options]
# Without options it runs on ../shared/models/stories260K.bin + tok512.bin when
# present, otherwise on a small synthetic model.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HWY_PREFIX=$(bash cmake/setup.sh | sed -n 's/^LUTRA_HWY_PREFIX=//p')
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  ${HWY_PREFIX:+-DCMAKE_PREFIX_PATH="$HWY_PREFIX"} >/dev/null
cmake --build build -j "$(nproc)" --target lutra-generate
if [ $# -eq 0 ]; then
  MODELS="$ROOT/../shared/models"
  if [ -f "$MODELS/stories260K.bin" ] && [ -f "$MODELS/tok512.bin" ]; then
    # A real TinyStories model, palettized at load to 4 bits per weight.
    set -- --model "$MODELS/stories260K.bin" --tokenizer "$MODELS/tok512.bin" \
      --bits 4 --prompt "Zoo" --steps 200 --temp 0.8 --seed 42 --threads "$(nproc)"
  else
    echo "[generate] ../shared/models/stories260K.bin not found: synthetic tiny model" >&2
    set -- --synthetic tiny --bits 4 --steps 64 --seed 42 --threads "$(nproc)"
  fi
fi
exec ./build/examples/lutra-generate "$@"
