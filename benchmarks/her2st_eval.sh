#!/usr/bin/env bash
# Held-out evaluation on HER2ST (../shared/data/her2st), as reported in BENCHMARKS.md.
#   bash benchmarks/her2st_eval.sh [OUTDIR] [extra histoindex evaluate options, e.g. --method stgchb]
# 1. converts the five sections to .h5ad (examples/her2st_to_h5ad.py);
# 2. protocol 1, mixed references: train on B4 (patient B) + three of C2-C5, hold out the fourth;
# 3. protocol 2: leave-one-out within patient C (train on the other three C sections), and the
#    cross-patient test (train on C2-C5, hold out B4).
# Every system of a fold (histoindex and its baselines) is scored in the same run on the same genes.
# Scores: per-gene Pearson r on held-out spots over the 785-gene panel (HEG-50, HVG-50, MG-8, all), MSE.
# Frozen-backbone features are cached in OUTDIR/features (shared by every run and method).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${HER2ST:-$here/../shared/data/her2st}
out=${1:-/tmp/her2st-eval}; shift || true
bin=${HISTOINDEX:-$here/.venv/bin}
tag=${TAG:-run}
mkdir -p "$out"
"$bin/python" "$here/examples/her2st_to_h5ad.py" --her2st "$data" --out "$out/h5ad" >/dev/null
h=$out/h5ad
common=(--platform st --genes "$data/gene_panel_785.txt" --json --cache "$out/features")
run() {  # name, then evaluate arguments
  local name=$1; shift
  /usr/bin/time -f "$tag $name wall %e s, peak RSS %M KB" "$bin/histoindex" evaluate "$@" "${common[@]}" "${extra[@]}" \
    --out "$out/$tag-$name.parquet" > "$out/$tag-$name.json"
}
extra=("$@")
run mixed "$h"/{B4,C2,C3,C4,C5}.h5ad --holdout C2 --holdout C3 --holdout C4 --holdout C5
run c_loo "$h"/C{2,3,4,5}.h5ad
run b4 "$h"/{C2,C3,C4,C5,B4}.h5ad --holdout B4
"$bin/python" - "$out" "$tag" <<'PY'
import json, sys
out, tag = sys.argv[1], sys.argv[2]
titles = {"mixed": "protocol 1, mixed references (B4 + three C sections)", "c_loo": "protocol 2, leave one out within patient C", "b4": "protocol 2, cross-patient (C2-C5 → B4)"}
for name, title in titles.items():
    report = json.load(open(f"{out}/{tag}-{name}.json"))
    print(f"## {tag}: {title}; folds {', '.join(f['holdout'] for f in report['folds'])}")
    print("| system | HEG-50 | HVG-50 | MG-8 | all | MSE |\n|---|---|---|---|---|---|")
    for system, s in report["summary"].items():
        print(f"| {system} | {s['HEG-50']:.3f} | {s['HVG-50']:.3f} | {s.get('MG-8', float('nan')):.3f} | {s['all']:.3f} | {s['MSE']:.3f} |")
    print("per fold, HEG-50 / HVG-50 (histoindex | frozen retrieval):")
    for f in report["folds"]:
        h, fr = f["scores"]["histoindex"], f["scores"]["frozen-retrieval"]
        per_epoch = f["train_seconds"] / max(f["epochs"], 1)
        check = f.get("inner_check") or {}
        said = f"; inner check: trained {check['trained']:.3f} vs frozen {check['frozen']:.3f} ({check['seconds']:.0f} s)" if check else ""
        print(f"  {f['holdout']}: {h['HEG-50']:.3f} / {h['HVG-50']:.3f} | {fr['HEG-50']:.3f} / {fr['HVG-50']:.3f}  (train {f['train_seconds']:.0f} s, {f['epochs']} epochs, {per_epoch:.2f} s/epoch{said})")
    print()
PY
