#!/usr/bin/env bash
# Walk-forward on the real files of ../shared/data (issues 14 and 22), 3 folds each: up/down on the daily stock
# file and on the hourly BTC export (the default model beside LightGBM, the blend and the naive rule), then 24-bar
# realized volatility on the hourly BTC export (regression with the QLIKE loss and volatility inputs, beside
# LightGBM, the blend, HAR, persistence and the naive rule). Prints each walk-forward table and leaves the run
# folders and walk_forward_<time>.json/.png under OUT (default: logs/walk_forward_real).
#   bash benchmarks/walk_forward_real.sh [OUT] [extra etft train args, e.g. --config tuned.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-logs/walk_forward_real}
shift || true
data=../shared/data
if [ ! -d "$data" ]; then
    echo "walk_forward_real: $data is missing (the shared real-data folder beside the project)" >&2
    exit 2
fi
.venv/bin/etft train --data "$data/us_stocks_daily_5sym_2000_2013_quandl_wiki_pd.csv.gz" \
    --set data.adjust_column=adj_close --set data.walk_forward_folds=3 --log_dir "$out/stocks_daily" "$@"
.venv/bin/etft train --data "$data/coinbase_btcusd_1h_2017_2019_raw.csv.gz" --set data.skip_rows=1 \
    --set data.columns='{volume: volume_btc}' --set data.timestamp_format='%Y-%m-%d %I-%p' \
    --set data.walk_forward_folds=3 --log_dir "$out/btc_hourly" "$@"
.venv/bin/etft train --data "$data/coinbase_btcusd_1h_2017_2019_raw.csv.gz" --set data.skip_rows=1 \
    --set data.columns='{volume: volume_btc}' --set data.timestamp_format='%Y-%m-%d %I-%p' \
    --task regression --set data.target=volatility --set data.horizon=24 \
    --set data.walk_forward_folds=3 --log_dir "$out/btc_hourly_vol24" "$@"
