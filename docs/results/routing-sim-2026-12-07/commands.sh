# Routing in the simulator with `room` as it now is: offline past every replica's room goes where it
# waits the fewest rounds, and chat takes the one of two random replicas holding less chat (published
# counts). The same runs as routing-sim-2026-12-06, plus a third seed; `serve` is Serve's routing.
# (The room runs with the overflow rule but chat still by queue length, code of commit 7edb8ee, gave
# attainment 0.992 / 0.977 / 0.986 at 804 / 866 / 880 offline tok/s for seeds 0 / 1 / 2; not kept.)
cd "$(dirname "$0")/../../.."  # the project root
for seed in 0 1 2; do for r in serve room; do
  .venv/bin/colocate simulate -c manifests/whatif-llama2-7b-a100.yaml --full-lengths --replicas 4 --rate 11 --duration-s 120 --policy colocate --ttft-p99-ms 539 --tpot-p99-ms 36 --seed $seed --offline-routing $r --out results/route-sim-1207-$r-s$seed > results/route-sim-1207-$r-s$seed.log 2>&1
done; done
