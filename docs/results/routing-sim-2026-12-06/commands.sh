cd "$(dirname "$0")/../../.."  # the project root
for seed in 0 1; do for r in serve room; do
  .venv/bin/colocate simulate -c manifests/whatif-llama2-7b-a100.yaml --full-lengths --replicas 4 --rate 11 --duration-s 120 --policy colocate --ttft-p99-ms 539 --tpot-p99-ms 36 --seed $seed --offline-routing $r --out results/route-sim-$r-s$seed > results/route-sim-$r-s$seed.log 2>&1
done; done
echo done > results/route-sim.done
