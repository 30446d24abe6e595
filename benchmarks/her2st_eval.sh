#!/usr/bin/env bash
# Held-out evaluation on HER2ST (../shared/data/her2st), as reported in BENCHMARKS.md.
#   bash benchmarks/her2st_eval.sh [OUTDIR] [extra histoindex evaluate options, e.g. --fine-tune --epochs 10]
# 1. converts the five sections to .h5ad (examples/her2st_to_h5ad.py);
# 2. leave-one-out over C2-C5 (train on the other three C sections);
# 3. the cross-patient test: train on C2-C5, hold out B4.
# Scores: per-gene Pearson r on held-out spots over the 785-gene panel (HEG-50, HVG-50, MG-8, all), MSE.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${HER2ST:-$here/../shared/data/her2st}
out=${1:-/tmp/her2st-eval}; shift || true
bin=${HISTOINDEX:-$here/.venv/bin}
mkdir -p "$out"
"$bin/python" "$here/examples/her2st_to_h5ad.py" --her2st "$data" --out "$out/h5ad" >/dev/null
common=(--platform st --genes "$data/gene_panel_785.txt" --json)
/usr/bin/time -f "C-LOO wall %e s, peak RSS %M KB" "$bin/histoindex" evaluate "$out"/h5ad/C{2,3,4,5}.h5ad "${common[@]}" --out "$out/c_loo.parquet" "$@" > "$out/c_loo.json"
/usr/bin/time -f "B4 wall %e s, peak RSS %M KB" "$bin/histoindex" evaluate "$out"/h5ad/{C2,C3,C4,C5,B4}.h5ad --holdout B4 "${common[@]}" --out "$out/b4.parquet" "$@" > "$out/b4.json"
"$bin/python" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("c_loo", "b4"):
    report = json.load(open(f"{out}/{name}.json"))
    print(f"## {name}: folds {', '.join(f['holdout'] for f in report['folds'])}")
    print("| system | HEG-50 | HVG-50 | MG-8 | all | MSE |\n|---|---|---|---|---|---|")
    for system, s in report["summary"].items():
        print(f"| {system} | {s['HEG-50']:.3f} | {s['HVG-50']:.3f} | {s.get('MG-8', float('nan')):.3f} | {s['all']:.3f} | {s['MSE']:.3f} |")
    print("per fold (histoindex HEG-50 / HVG-50):", ", ".join(f"{f['holdout']} {f['scores']['histoindex']['HEG-50']:.3f}/{f['scores']['histoindex']['HVG-50']:.3f} ({f['train_seconds']:.0f} s train)" for f in report["folds"]))
PY
