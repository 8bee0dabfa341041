#!/usr/bin/env bash
# Walk-forward on the real files of ../shared/data (issue 14): the default model beside LightGBM and the naive
# rule, 3 folds each, on the daily stock file and on the hourly BTC export. Prints each walk-forward table and
# leaves the run folders and walk_forward_<time>.json/.png under OUT (default: logs/walk_forward_real).
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
