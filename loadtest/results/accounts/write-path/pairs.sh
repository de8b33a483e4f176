#!/usr/bin/env bash
# Alternate the tree before issue 15 (66b7915, /tmp/before15) and HEAD (/work/main): each run
# its own embedded PostgreSQL, service and pgbench baseline; the figure is service/pgbench.
scenario=$1; pairs=$2; out=$3
mkdir -p $out
for i in $(seq ${START:-1} $pairs); do
  for side in before after; do
    dir=/tmp/before15; [ $side = after ] && dir=/work/main
    extra=""; [ $scenario = hot ] && extra="--versus-uniform"
    (cd $dir && /work/main/.venv/bin/python -m loadtest $scenario --self-serve --baseline $extra --rounds 1 --clients 16 --duration 8 > $out/$scenario-$side-$i.json 2> $out/$scenario-$side-$i.err)
    python3 -c "import json;r=json.load(open('$out/$scenario-$side-$i.json'));print('$scenario $side $i', r['baseline']['ratio'], r.get('transfers_per_second', r.get('throughput')))"
  done
done
