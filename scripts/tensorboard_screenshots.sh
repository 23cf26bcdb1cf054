#!/usr/bin/env bash
# Screenshots of TensorBoard's HPARAMS table and Time Series page for a folder of runs, taken in
# headless Chromium (apt-get install chromium), as README.md and docs/sweeps.md show them:
#   scripts/tensorboard_screenshots.sh outputs/multirun/<date>/<time> docs/images
# Time Series is drawn with SVG (?forceSVG=true): headless Chromium does not always finish
# TensorBoard's WebGL line charts before the screenshot.
set -euo pipefail
logdir=$1
out=${2:-docs/images}
port=${PORT:-6123}
cd "$(dirname "$0")/.."
mkdir -p "$out"
.venv/bin/tensorboard --logdir "$logdir" --port "$port" >/dev/null 2>&1 &
board=$!
trap 'kill $board' EXIT
for _ in $(seq 60); do curl -sf "http://localhost:$port" >/dev/null && break; sleep 1; done
shoot() {  # size, file, URL
    chromium --headless=new --no-sandbox --hide-scrollbars --window-size="$1" --virtual-time-budget=30000 \
        --screenshot="$2" "$3" 2>/dev/null
}
shoot 2300,520 "$out/tensorboard_hparams.png" "http://localhost:$port/#hparams"
shoot 1500,1000 "$out/tensorboard_time_series.png" "http://localhost:$port/?forceSVG=true#timeseries"
echo "wrote $out/tensorboard_hparams.png and $out/tensorboard_time_series.png"
