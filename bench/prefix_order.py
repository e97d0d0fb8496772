"""Prefix-sharing order bench: the same offline batch admitted by arrival and grouped by prefix.

A batch where many requests share a long instruction header (`num_templates` headers of
`header_words` words, each request its header plus a short question of its own, in a seeded
random order) runs on one real vLLM engine with prefix caching on and `ColocateScheduler`
enforcing a static offline budget (`offline_seqs` in flight), once with the default admission
order (by arrival) and once with `order.offline_policy: prefix_sharing` (a depth-first walk of the
prompt trie, `orchestrator.engine.order.prefix_sharing_order`), each on a fresh engine. The KV
cache is capped (`num_kv_blocks`) below what all headers need at once, as a busy replica's cache
is: in arrival order a header's blocks are evicted before its next request comes, grouped they
are still cached. Reported per order: wall time, offline output and prompt tokens/s, and the
prompt tokens the engine actually computed (the rest came from the prefix cache), from the
engine's own step telemetry; the ratio of the two runs' throughput; `results.json` and a PNG.

    python -m bench.prefix_order --out results/prefix-order
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import project_path

ORDERS = ("fcfs", "prefix_sharing")


@dataclass
class PrefixBenchOptions:
    num_requests: int = 192
    num_templates: int = 24
    header_words: int = 220
    question_words: int = 12
    output_tokens: int = 8
    offline_seqs: int = 8
    """Offline sequences the static budget lets run at once (as beside chat)."""
    num_kv_blocks: int = 64
    """KV cache blocks: 8,192 tokens with vLLM-CPU's 128-token blocks, what the running
    sequences need plus a few headers, far below all of them (24 x ~700 tokens). At 160 blocks
    (20,480 tokens) every header stayed cached in either order: both computed the same tokens."""
    max_num_seqs: int = 16
    seed: int = 0


def build_batch(opts: PrefixBenchOptions) -> list[tuple[str, str]]:
    """(template id, prompt) pairs in a seeded random order; every template used equally."""
    rng = random.Random(opts.seed)
    vocab = [f"w{i}" for i in range(3000)]
    headers = [" ".join(rng.choice(vocab) for _ in range(opts.header_words)) for _ in range(opts.num_templates)]
    batch = []
    for i in range(opts.num_requests):
        t = i % opts.num_templates
        question = " ".join(rng.choice(vocab) for _ in range(opts.question_words))
        batch.append((f"t{t}", f"Instructions: {headers[t]}\nItem {i}: {question}"))
    rng.shuffle(batch)
    return batch


def summarize(order: str, wall_s: float, output_tokens: int, prompt_tokens: int, computed_prompt_tokens: int | None,
              num_requests: int) -> dict[str, Any]:
    return {"order": order, "wall_s": wall_s, "num_requests": num_requests,
            "output_tokens_per_s": output_tokens / wall_s, "prompt_tokens_per_s": prompt_tokens / wall_s,
            "requests_per_s": num_requests / wall_s, "prompt_tokens": prompt_tokens,
            "computed_prompt_tokens": computed_prompt_tokens,
            "prefix_cache_share": (None if computed_prompt_tokens is None
                                   else 1.0 - computed_prompt_tokens / max(1, prompt_tokens))}


def with_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next(r for r in rows if r["order"] == "fcfs")
    return [{**r, "throughput_vs_fcfs": r["requests_per_s"] / base["requests_per_s"]} for r in rows]


def _run_order(config, source: str, order: str, batch: list[tuple[str, str]], opts: PrefixBenchOptions,
               on_progress) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from orchestrator.config import OrderConfig
    from orchestrator.engine.budget import OfflineBudget
    from orchestrator.engine.channel import EngineChannel, rows_to_columns
    from orchestrator.names import ENV_ENGINE_CHANNEL, ENV_ENGINE_ORDER
    from orchestrator.request_class import RequestClass, vllm_priority
    from orchestrator.serving.app import engine_kwargs

    os.environ[ENV_ENGINE_ORDER] = OrderConfig(offline_policy=order).model_dump_json()
    channel = EngineChannel.create(ring_capacity=1 << 16)
    os.environ[ENV_ENGINE_CHANNEL] = str(channel.path)
    budget = OfflineBudget.flat(opts.offline_seqs, opts.offline_seqs + 512)
    channel.set_fallback(budget)
    channel.write_budget(budget, valid_for_s=1e9)
    kwargs = engine_kwargs(config)
    kwargs.update(max_num_seqs=opts.max_num_seqs, enable_prefix_caching=True,
                  num_gpu_blocks_override=opts.num_kv_blocks)
    kwargs.pop("disable_log_stats", None)
    engine = None
    try:
        on_progress(f"prefix bench: {order}: starting an engine ({opts.num_kv_blocks} KV blocks)")
        engine = LLM(model=source, **kwargs).llm_engine
        params = SamplingParams(max_tokens=opts.output_tokens, ignore_eos=True, temperature=0.0)
        steps_before = channel.num_steps()
        t0 = time.monotonic()
        for i, (_, prompt) in enumerate(batch):
            engine.add_request(f"{order}-{i}", prompt, params, priority=vllm_priority(RequestClass.OFFLINE))
        output_tokens = prompt_tokens = done = 0
        last = t0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done += 1
                    output_tokens += len(out.outputs[0].token_ids)
                    prompt_tokens += len(out.prompt_token_ids or ())
            if time.monotonic() - last > 5.0:
                last = time.monotonic()
                on_progress(f"prefix bench: {order}: {done}/{len(batch)} done")
        wall_s = time.monotonic() - t0
        rows, _ = channel.steps_since(steps_before)
        steps = rows_to_columns(rows)
        computed = int(steps["num_prefill_tokens"].sum()) if len(rows) < (1 << 16) else None
    finally:
        if engine is not None:
            engine.engine_core.shutdown()
        channel.close(unlink=True)
        os.environ.pop(ENV_ENGINE_CHANNEL, None)
        os.environ.pop(ENV_ENGINE_ORDER, None)
    return summarize(order, wall_s, output_tokens, prompt_tokens, computed, len(batch))


def run(config, out: Path, opts: PrefixBenchOptions, on_progress=print) -> dict[str, Any]:
    from orchestrator.serving.app import resolve_model_source

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    source = resolve_model_source(config)
    batch = build_batch(opts)
    rows = [_run_order(config, source, order, batch, opts, on_progress) for order in ORDERS]
    rows = with_ratio(rows)
    doc = {"kind": "prefix-order-bench", "model": project_path(source), "options": asdict(opts), "results": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, out / "prefix-order.png")
    return doc


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r["order"] for r in rows]
    ax.bar(names, [r["requests_per_s"] for r in rows], color=["tab:gray", "tab:green"])
    ax.set_ylabel("offline requests / s")
    ax.set_title("batch throughput")
    bx.bar(names, [100 * (r["prefix_cache_share"] or 0) for r in rows], color=["tab:gray", "tab:green"])
    bx.set_ylabel("% of prompt tokens from the cache")
    bx.set_title("prefix cache")
    fig.suptitle("Shared-header batch: admission by arrival vs grouped by prefix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from orchestrator.config import load_config

    p = argparse.ArgumentParser(prog="python -m bench.prefix_order", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="manifests/colocate-bench.yaml")
    for name, value in asdict(PrefixBenchOptions()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    opts = PrefixBenchOptions(**{k: getattr(args, k) for k in asdict(PrefixBenchOptions())})
    doc = run(load_config(args.config), args.out, opts)
    for r in doc["results"]:
        share = "-" if r["prefix_cache_share"] is None else f"{100 * r['prefix_cache_share']:.0f}%"
        print(f"{r['order']:<15} {r['wall_s']:7.1f} s  {r['requests_per_s']:6.2f} req/s  "
              f"{r['prompt_tokens_per_s']:7.0f} prompt tok/s  prefix cache {share}  "
              f"x{r['throughput_vs_fcfs']:.2f} vs fcfs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
