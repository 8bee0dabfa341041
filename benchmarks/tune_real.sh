#!/usr/bin/env bash
# The tuned model's walk-forward row of issue 14, on the real files of ../shared/data: `etft tune` on each file
# with the validation block of walk-forward fold 0 as the objective (it ends where fold 0's test block starts,
# so no test bar of any fold takes part in the choice), then benchmarks/walk_forward_real.sh with the best config.
#   bash benchmarks/tune_real.sh [OUT] [TRIALS]     (default: logs/tune_real, 12 trials per file)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-logs/tune_real}
trials=${2:-12}
data=../shared/data
if [ ! -d "$data" ]; then
    echo "tune_real: $data is missing (the shared real-data folder beside the project)" >&2
    exit 2
fi
fold0=(--set data.walk_forward_folds=3 --set data.fold=0)
.venv/bin/etft tune --trials "$trials" --log_dir "$out/stocks_daily" "${fold0[@]}" \
    --set data.source=file --set data.path="$data/us_stocks_daily_5sym_2000_2013_quandl_wiki_pd.csv.gz" \
    --set data.adjust_column=adj_close
.venv/bin/etft tune --trials "$trials" --log_dir "$out/btc_hourly" "${fold0[@]}" \
    --set data.source=file --set data.path="$data/coinbase_btcusd_1h_2017_2019_raw.csv.gz" --set data.skip_rows=1 \
    --set data.columns='{volume: volume_btc}' --set data.timestamp_format='%Y-%m-%d %I-%p'
# every fold with the best trial's model and training keys (its config names fold 0: data.fold=null trains all)
for name in stocks_daily btc_hourly; do
    .venv/bin/etft train --config "$out/$name/tune_etft/best_config.yaml" --set data.fold=null \
        --log_dir "$out/$name/walk_forward"
done
