#!/usr/bin/env bash
# Across patients on HER2ST (issue 21), as reported first in BENCHMARKS.md:
#   bash benchmarks/her2st_patients.sh [OUTDIR] [extra histoindex evaluate options]
# Same data, panel and settings as benchmarks/her2st_eval.sh (the two share OUTDIR/features).
# 1. patients: --protocol patient; patient B held out (train C2-C5, test B4) and patient C held
#    out (train B4, test each of C2-C5); model, panel and every baseline see the training patient only;
# 2. c_loo: leave one section out within patient C (within-patient protocol);
# 3. mixed: train on B4 + three of C2-C5, hold out the fourth (mixed-patient protocol).
# RUNS="patients c_loo" picks runs (default: all three, in that order). Every baseline is scored in
# the same run on the same genes; "depth-only" is context, not a competitor (it reads the truth's depth).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${HER2ST:-$here/../shared/data/her2st}
out=${1:-/tmp/her2st-eval}; shift || true
bin=${HISTOINDEX:-$here/.venv/bin}
tag=${TAG:-patients}
runs=${RUNS:-patients c_loo mixed}
mkdir -p "$out"
"$bin/python" "$here/examples/her2st_to_h5ad.py" --her2st "$data" --out "$out/h5ad" >/dev/null
h=$out/h5ad
common=(--platform st --genes "$data/gene_panel_785.txt" --json --cache "$out/features")
extra=("$@")
run() {  # name, then evaluate arguments
  local name=$1; shift
  /usr/bin/time -o "$out/$tag-$name.time" -f "%e %M" "$bin/histoindex" evaluate "$@" "${common[@]}" "${extra[@]}" \
    --out "$out/$tag-$name.parquet" > "$out/$tag-$name.json"
}
for name in $runs; do
  case $name in
    patients) run patients "$h"/{C2,C3,C4,C5,B4}.h5ad --protocol patient --holdout B --holdout C \
                --patient B4=B --patient C2=C --patient C3=C --patient C4=C --patient C5=C ;;
    c_loo) run c_loo "$h"/C{2,3,4,5}.h5ad ;;
    mixed) run mixed "$h"/{B4,C2,C3,C4,C5}.h5ad --holdout C2 --holdout C3 --holdout C4 --holdout C5 ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
done
"$bin/python" - "$out" "$tag" $runs <<'PY'
import json, sys
out, tag, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
systems = ["histoindex", "mean", "frozen-retrieval", "frozen-retrieval+", "frozen-ridge", "depth-only"]
print("| protocol | fold (train → test) | " + " | ".join(s + (" (context only)" if s == "depth-only" else "") for s in systems)
      + " | ridge α (inner CV over) | train s | answer s | peak RSS MB |")
print("|---|---|" + "---|" * (len(systems) + 4))
for name in runs:
    report = json.load(open(f"{out}/{tag}-{name}.json"))
    wall, rss_kb = open(f"{out}/{tag}-{name}.time").read().split()
    for f in report["folds"]:
        s = f["scores"]
        cells = [f"{s[x]['HEG-50']:.3f} / {s[x]['HVG-50']:.3f}" if x in s else "–" for x in systems]
        train = "+".join(f["train_sections"])
        ridge = f.get("ridge") or {}
        print(f"| {name} | {train} → {f['holdout']} | " + " | ".join(cells)
              + f" | {ridge.get('alpha', float('nan')):g} ({ridge.get('groups', '')}) | {f['train_seconds']:.0f} | {f['answer_seconds']:.1f} | {f['peak_rss_mb']:.0f} |")
    m = report["summary"]
    cells = [f"{m[x]['HEG-50']:.3f} / {m[x]['HVG-50']:.3f}" if x in m else "–" for x in systems]
    print(f"| {name} | mean of {len(report['folds'])} folds | " + " | ".join(cells) + f" | | whole run {float(wall):.0f} s wall | | {int(rss_kb) / 1024:.0f} |")
PY
