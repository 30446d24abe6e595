#!/usr/bin/env bash
# Start-up time of everyday commands (BENCHMARKS.md, "Start-up"): builds the demo store once, then
# times each command 6 times and prints the median of the last 5 (warm page cache).
#   bash benchmarks/startup_bench.sh [WORKDIR]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${HISTOINDEX:-$here/.venv/bin}
work=${1:-/tmp/histoindex-startup}
export HF_HUB_OFFLINE=1
rm -rf "$work"
"$bin/histoindex" demo --workdir "$work" >/dev/null 2>&1
db=$work/histoindex.db
median() {
  local name=$1; shift
  for _ in 1 2 3 4 5 6; do
    local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    python3 -c "print($e - $s)"
  done | tail -5 | sort -n | sed -n 3p | xargs printf "| \`%s\` | %.2f s |\n" "$name"
}
echo "| command | median |"
echo "|---|---|"
median "python -c 'import histoindex'" "$bin/python" -c "import histoindex"
median "histoindex --help" "$bin/histoindex" --help
median "histoindex query --help" "$bin/histoindex" query --help
median "histoindex info" "$bin/histoindex" info --db "$db"
median "histoindex versions" "$bin/histoindex" versions --db "$db"
median "histoindex sql count" "$bin/histoindex" sql "SELECT count(*) FROM spots" --db "$db"
