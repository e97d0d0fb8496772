cd "$(git rev-parse --show-toplevel)"  # the project root, wherever it is checked out
for spec in "16 60" "64 30" "256 15"; do
  set -- $spec
  /usr/bin/time -v .venv/bin/colocate simulate -c manifests/colocate-emulated.yaml --replicas $1 --rate $((2*$1)) --duration-s $2 --policy colocate --controller-model oracle --ttft-p99-ms 600 --tpot-p99-ms 50 --num-offline-requests 200000 --out results/scale-$1 > results/scale-$1.log 2>&1
done
.venv/bin/python -m bench.decide_scale --replicas 1,64,256,1024 --ticks 40 --out results/decide-scale.json > results/decide-scale.log 2>&1
echo ALLDONE > results/scale.done
