"""Length-scheduling bench: FCFS against shortest-predicted-first, the oracle, and injected errors.

One real vLLM engine (the config's model, `ColocateScheduler` with its starvation guard) serves
the same chat workload under every ordering policy in turn, beside a batch job held at a static
cap of offline sequences:

- chat: ShareGPT prompts of the length predictor's *test* split (never trained on), each asked
  for its real reply's length (tokens of the served tokenizer, divided by `length_scale` so a
  run fits in minutes on a CPU; the order of lengths is what scheduling sees, and scaling keeps
  it) with `ignore_eos` (the local model's weights are random), arriving in bursts (gamma
  inter-arrivals, CV `cv`) at `load` times the engine's chat capacity, measured first on this
  host: nothing here is a timing constant;
- policies: `fcfs` (every request at level 0), `sjf` (the trained predictor, with the replica's
  online correction and quality monitor), `oracle` (the true lengths), `tau0.3`, `tau0` and
  `adversarial` (the truth degraded by `latency_model.length.online.degrade`), all through the
  same `LengthOrdering` the replica uses: the monitor sees each completion, so a bad predictor
  loses trust and its order drifts to FCFS;
- rounds: the requests are split into `rounds` consecutive slices and every policy serves
  each slice in turn, the policy order reversed every other round (and the two engines' order
  with it), so a host that drifts during the run (one 300-request run without rounds saw the
  mean rise 13% from its first to its sixth policy, two of them the same FCFS order) weighs on
  every policy alike; each policy keeps its predictor state (online correction, quality
  monitor) across rounds, as a replica would; per-round means are kept to show the drift;
- reported per policy (pooled over rounds): chat end-to-end latency mean/p50/p99, TTFT
  mean/p99, attainment of a TTFT target (`ttft_factor` times this host's TTFT of a lone
  request) with its Wilson lower bound, offline output tokens/s, guard promotions, and the
  ratios against FCFS; `results.json` and a PNG.

This is the engine tier (no Ray Serve): the ordering is decided in the engine from the priority
the replica computes (`orchestrator.serving.length_order`), and this bench computes it with the
same code; the serving path is covered by the integration tests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import project_path

POLICIES = ("fcfs", "sjf", "oracle", "tau0.3", "tau0", "adversarial", "srpt", "srpt-oracle")
"""`srpt*`: the same predictions with limited preemption of running chat (`order.policy: srpt`),
on an engine of their own (the engine's order is fixed at its start)."""


@dataclass
class LengthBenchOptions:
    num_requests: int = 300
    """Chat requests per policy (300: enough to read a 99% attainment's Wilson bound)."""
    load: float = 0.8
    """Mean arrival rate as a share of the engine's chat capacity (measured beside the batch job)."""
    cv: float = 2.0
    """Coefficient of variation of inter-arrival times (bursts)."""
    length_scale: float | None = None
    """True reply tokens are divided by this; None: so that the median asks for `median_tokens`."""
    median_tokens: int = 24
    max_tokens: int = 256
    prompt_chars: int = 600
    """Prompts are sent cut to this many characters (bounds prefill cost; the predictor reads
    the whole prompt, as a replica does)."""
    max_num_seqs: int = 8
    """Engine slots: small enough that bursts queue (SJF only matters when requests wait)."""
    offline_in_flight: int = 2
    offline_prompt_words: int = 60
    offline_tokens: int = 48
    ttft_factor: float = 5.0
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    rounds: int = 3
    """Slices of the workload every policy serves in turn (order reversed every other round)."""


@dataclass
class ChatRequest:
    prompt: str
    true_tokens: int
    """The reply's real length in the served tokenizer."""
    max_tokens: int
    """What the engine is asked to produce (true_tokens / length_scale)."""
    arrival_s: float


@dataclass
class PolicyResult:
    policy: str
    e2e_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    offline_tokens: int = 0
    duration_s: float = 0.0
    num_guard_promotions: int = 0
    num_chat_preempted: int = 0
    chat_tokens_computed: int = 0
    """Chat tokens the engine computed (prompt, recomputed prompt after a preemption, output)."""
    busy_s: float = 0.0
    """Engine step time summed over the run (its counters): busy / duration is the utilization."""
    live_tau: float | None = None
    trust: float | None = None


def build_workload(prompts: Sequence[str], true_tokens: Sequence[int], *, rate_per_s: float,
                   opts: LengthBenchOptions) -> list[ChatRequest]:
    """`opts.num_requests` requests drawn (seeded) from the given prompts, bursty arrivals."""
    from bench.bursty import gamma_interarrivals_s

    rng = np.random.default_rng(opts.seed)
    n = opts.num_requests
    picks = rng.choice(len(prompts), size=n, replace=len(prompts) < n)
    tokens = np.asarray(true_tokens)[picks]
    scale = length_scale(true_tokens, opts)
    gaps = gamma_interarrivals_s(n, rate_per_s=rate_per_s, cv=opts.cv, rng=rng)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    return [ChatRequest(prompts[i], int(t), int(np.clip(round(t / scale), 1, opts.max_tokens)), float(a))
            for i, t, a in zip(picks, tokens, arrivals)]


def round_slices(workload: list[ChatRequest], rounds: int) -> list[list[ChatRequest]]:
    """`workload` cut into `rounds` consecutive slices, each slice's arrivals starting at 0."""
    cuts = np.array_split(np.arange(len(workload)), max(1, min(rounds, len(workload))))
    out = []
    for idx in cuts:
        start = workload[idx[0]].arrival_s
        out.append([ChatRequest(r.prompt, r.true_tokens, r.max_tokens, r.arrival_s - start)
                    for r in (workload[i] for i in idx)])
    return out


def round_schedule(groups: list[tuple[Any, list[str]]], rounds: int) -> list[tuple[int, Any, list[str]]]:
    """(round, engine order, policies) in run order: every other round reverses both the engines'
    order and the policies' order on each (ABBA), so a linear drift over the run costs every
    policy about the same."""
    plan = []
    for k in range(rounds):
        seq = [(order, list(policies)) for order, policies in groups if policies]
        if k % 2:
            seq = [(order, policies[::-1]) for order, policies in seq[::-1]]
        plan.extend((k, order, policies) for order, policies in seq)
    return plan


def pooled(parts: list[PolicyResult]) -> PolicyResult:
    """One policy's results over its rounds."""
    out = PolicyResult(parts[0].policy)
    for r in parts:
        out.e2e_ms += r.e2e_ms
        out.ttft_ms += r.ttft_ms
        out.offline_tokens += r.offline_tokens
        out.duration_s += r.duration_s
        out.num_guard_promotions += r.num_guard_promotions
        out.num_chat_preempted += r.num_chat_preempted
        out.chat_tokens_computed += r.chat_tokens_computed
        out.busy_s += r.busy_s
    out.live_tau, out.trust = parts[-1].live_tau, parts[-1].trust
    return out


def length_scale(true_tokens: Sequence[int], opts: LengthBenchOptions) -> float:
    """What real reply lengths are divided by to become `max_tokens`."""
    return opts.length_scale or max(float(np.median(np.asarray(true_tokens))) / opts.median_tokens, 1e-9)


class _ScaledPredictor:
    """A predictor's lengths divided by the bench's length scale: the engine produces scaled
    replies, and limited preemption compares a prediction with the tokens produced so far."""

    def __init__(self, predictor, scale: float) -> None:
        self.predictor, self.scale = predictor, scale
        self.quantiles = predictor.quantiles
        self.meta = getattr(predictor, "meta", {})

    def predict(self, prompts):
        return np.maximum(np.asarray(self.predictor.predict(prompts)) / self.scale, 1.0)


class _TablePredictor:
    """Predictions given per prompt (the oracle and the injected-error variants)."""

    quantiles = (0.5,)

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def predict(self, prompts):
        return np.asarray([[self.table[p]] for p in prompts])


def predictions_for(policy: str, workload: list[ChatRequest], *, seed: int) -> dict[str, float] | None:
    """The table a table-driven policy orders by (None for fcfs and the trained predictor)."""
    from latency_model.length.online import degrade

    truth = np.asarray([r.max_tokens for r in workload], dtype=np.float64)
    if policy in ("oracle", "srpt-oracle"):
        values = truth
    elif policy == "adversarial":
        values = degrade(truth, "adversarial")
    elif policy.startswith("tau"):
        values = degrade(truth, float(policy[3:]), seed=seed)
    else:
        return None
    return {r.prompt: float(v) for r, v in zip(workload, values)}


def summarize(res: PolicyResult, *, ttft_target_ms: float) -> dict[str, Any]:
    from orchestrator.stats import percentile, wilson_interval

    e2e, ttft = np.asarray(res.e2e_ms), np.asarray(res.ttft_ms)
    met = int(np.sum(ttft <= ttft_target_ms))
    low, _ = wilson_interval(met, len(ttft))
    return {
        "policy": res.policy, "num_requests": len(e2e),
        "e2e_mean_ms": float(e2e.mean()), "e2e_p50_ms": percentile(e2e, 50), "e2e_p99_ms": percentile(e2e, 99),
        "ttft_mean_ms": float(ttft.mean()), "ttft_p99_ms": percentile(ttft, 99),
        "attainment": met / len(ttft), "attainment_wilson_low": low,
        "offline_output_tok_s": res.offline_tokens / res.duration_s if res.duration_s else 0.0,
        "num_guard_promotions": res.num_guard_promotions, "num_chat_preempted": res.num_chat_preempted,
        "chat_tokens_computed_per_request": res.chat_tokens_computed / len(e2e) if len(e2e) else None,
        "engine_busy_share": res.busy_s / res.duration_s if res.duration_s else None,
        "live_tau": res.live_tau, "trust": res.trust,
    }


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next((r for r in rows if r["policy"] == "fcfs"), None)
    for r in rows:
        if base is not None:
            r["e2e_mean_vs_fcfs"] = r["e2e_mean_ms"] / base["e2e_mean_ms"]
            r["e2e_p99_vs_fcfs"] = r["e2e_p99_ms"] / base["e2e_p99_ms"]
            r["offline_vs_fcfs"] = (r["offline_output_tok_s"] / base["offline_output_tok_s"]
                                    if base["offline_output_tok_s"] else None)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'policy':12}{'e2e mean':>10}{'p50':>8}{'p99':>8}{'TTFT mean':>11}{'p99':>8}{'attain':>8}"
            f"{'(low)':>7}{'offline/s':>10}{'mean/FCFS':>10}{'p99/FCFS':>9}{'tau':>7}{'trust':>6}{'preempt':>8}"
            f"{'chat tok/req':>13}{'busy':>6}")
    lines = [head]
    for r in rows:
        tau = "" if r["live_tau"] is None else f"{r['live_tau']:.2f}"
        trust = "" if r["trust"] is None else f"{r['trust']:.2f}"
        lines.append(f"{r['policy']:12}{r['e2e_mean_ms']:>10.0f}{r['e2e_p50_ms']:>8.0f}{r['e2e_p99_ms']:>8.0f}"
                     f"{r['ttft_mean_ms']:>11.0f}{r['ttft_p99_ms']:>8.0f}{r['attainment']:>8.3f}"
                     f"{r['attainment_wilson_low']:>7.3f}{r['offline_output_tok_s']:>10.1f}"
                     f"{r.get('e2e_mean_vs_fcfs', float('nan')):>10.2f}{r.get('e2e_p99_vs_fcfs', float('nan')):>9.2f}"
                     f"{tau:>7}{trust:>6}{r.get('num_chat_preempted', 0):>8}"
                     f"{_fmt(r.get('chat_tokens_computed_per_request'), 13, '.0f')}{_fmt(r.get('engine_busy_share'), 6, '.2f')}")
    return "\n".join(lines)


def _fmt(value: float | None, width: int, spec: str) -> str:
    return f"{'':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_rounds(per_round: list[dict[str, Any]]) -> str:
    """E2E mean ms of each policy in each round, in run order within the round: the drift."""
    rounds = sorted({r["round"] for r in per_round})
    policies = list(dict.fromkeys(r["policy"] for r in per_round))
    mean = {(r["policy"], r["round"]): r["e2e_mean_ms"] for r in per_round}
    lines = [f"{'e2e mean ms':12}" + "".join(f"{'round ' + str(k):>10}" for k in rounds)]
    for policy in policies:
        lines.append(f"{policy:12}" + "".join(f"{mean[(policy, k)]:>10.0f}" if (policy, k) in mean else f"{'':>10}"
                                               for k in rounds))
    return "\n".join(lines)


# --- the engine run ---------------------------------------------------------------------------

def _offline_prompt(i: int, words: int) -> str:
    vocab = "the batch job summarizes a long paper about latency and throughput of the engine".split()
    return " ".join(vocab[(i * 7 + k) % len(vocab)] for k in range(words)) + f" part {i}"


def _run_policy(engine, policy: str, workload: list[ChatRequest], ordering, opts: LengthBenchOptions,
                channel_counter: Callable[[], int], on_progress: Callable[[str], None]) -> PolicyResult:
    from vllm import SamplingParams

    from orchestrator.request_class import RequestClass, vllm_priority

    res = PolicyResult(policy)
    offline_params = SamplingParams(max_tokens=opts.offline_tokens, ignore_eos=True, temperature=0.0)
    pending = list(workload)
    live: dict[str, tuple[ChatRequest, float, float | None, Any]] = {}  # id -> (req, arrival, first, prediction)
    offline_live: set[str] = set()
    num_offline = 0
    promotions_before = channel_counter()
    t0 = time.monotonic()
    last_progress = t0

    def add_offline() -> None:
        nonlocal num_offline
        rid = f"{policy}-off-{num_offline}"
        engine.add_request(rid, _offline_prompt(num_offline, opts.offline_prompt_words), offline_params,
                           priority=vllm_priority(RequestClass.OFFLINE))
        offline_live.add(rid)
        num_offline += 1

    for _ in range(opts.offline_in_flight):
        add_offline()
    done = 0
    while pending or live:
        now = time.monotonic() - t0
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            rid = f"{policy}-chat-{len(workload) - len(pending)}"
            level, prediction = ordering.level(RequestClass.ONLINE, r.prompt) if ordering else (0, None)
            engine.add_request(rid, r.prompt[:opts.prompt_chars],
                               SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0),
                               priority=vllm_priority(RequestClass.ONLINE, level))
            live[rid] = (r, time.monotonic(), None, prediction)
        for out in engine.step():
            rid = out.request_id
            if rid in offline_live:
                if out.finished:
                    res.offline_tokens += len(out.outputs[0].token_ids)
                    offline_live.discard(rid)
                    if pending or live:
                        add_offline()
                continue
            if rid not in live:
                continue
            r, arrived, first, prediction = live[rid]
            stamp = time.monotonic()
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = stamp
                live[rid] = (r, arrived, first, prediction)
            if out.finished:
                res.ttft_ms.append(((first or stamp) - arrived) * 1000.0)
                res.e2e_ms.append((stamp - arrived) * 1000.0)
                if ordering is not None and prediction is not None:
                    ordering.observe(r.prompt, prediction, len(out.outputs[0].token_ids))
                del live[rid]
                done += 1
        if time.monotonic() - last_progress > 5.0:
            last_progress = time.monotonic()
            on_progress(f"length bench: {policy}: {done}/{len(workload)} chat requests done, "
                        f"{len(live)} in the engine, {res.offline_tokens} offline tokens")
    res.duration_s = time.monotonic() - t0
    for rid in list(offline_live):  # the batch job's last requests stop with the chat
        engine.abort_request([rid])
    while engine.has_unfinished_requests():
        engine.step()
    res.num_guard_promotions = channel_counter() - promotions_before
    if ordering is not None:
        res.live_tau, res.trust = ordering.monitor.tau(), ordering.monitor.trust()
    return res


def _capacity_req_s(engine, workload: list[ChatRequest], opts: LengthBenchOptions) -> tuple[float, float]:
    """(chat requests/s the engine completes with every slot busy, beside the batch job at its
    cap, as in the runs; TTFT ms of a lone request): a closed burst of 4 x max_num_seqs requests,
    then 5 requests one at a time. (Measured without the batch job, the capacity read 1.74 req/s
    where the runs had 6 of 8 slots for chat: 0.9x of it overloaded them, FCFS met a TTFT target
    for 5% of requests and every queue grew for the whole run.)"""
    from vllm import SamplingParams

    from orchestrator.request_class import RequestClass, vllm_priority

    offline = SamplingParams(max_tokens=opts.offline_tokens, ignore_eos=True)
    offline_ids: set[str] = set()

    def keep_offline() -> None:
        while len(offline_ids) < opts.offline_in_flight:
            rid = f"cap-off-{len(offline_ids)}-{time.monotonic_ns()}"
            engine.add_request(rid, _offline_prompt(len(offline_ids), opts.offline_prompt_words), offline,
                               priority=vllm_priority(RequestClass.OFFLINE))
            offline_ids.add(rid)

    sample = workload[: 4 * opts.max_num_seqs]
    chat_ids = set()
    keep_offline()
    t0 = time.monotonic()
    for i, r in enumerate(sample):
        chat_ids.add(f"cap-{i}")
        engine.add_request(f"cap-{i}", r.prompt[:opts.prompt_chars],
                           SamplingParams(max_tokens=r.max_tokens, ignore_eos=True), priority=0)
    while chat_ids:
        for out in engine.step():
            if out.finished:
                chat_ids.discard(out.request_id)
                offline_ids.discard(out.request_id)
        keep_offline()
    rate = len(sample) / (time.monotonic() - t0)
    engine.abort_request(list(offline_ids))
    while engine.has_unfinished_requests():
        engine.step()
    ttfts = []
    for i, r in enumerate(workload[:5]):
        start = time.monotonic()
        engine.add_request(f"alone-{i}", r.prompt[:opts.prompt_chars], SamplingParams(max_tokens=2, ignore_eos=True))
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.monotonic()
        ttfts.append(((first or time.monotonic()) - start) * 1000.0)
    return rate, float(np.median(ttfts))


def run_length_bench(config, *, data: Path, predictor_dir: Path, out: Path, opts: LengthBenchOptions,
                     on_progress: Callable[[str], None] = print) -> dict[str, Any]:
    from latency_model.length.data import load_table, tokenizer_counter
    from latency_model.length.predictor import load_predictor
    from orchestrator.engine.channel import EngineChannel
    from orchestrator.names import ENV_ENGINE_CHANNEL, ENV_ENGINE_ORDER
    from orchestrator.serving.app import engine_kwargs, resolve_model_source
    from orchestrator.serving.length_order import LengthOrdering

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model_source(config)
    predictor = load_predictor(predictor_dir)
    test = load_table(data, tokenizer_counter(source)).splits()["test"]
    predictor = _ScaledPredictor(predictor, length_scale(test.tokens, opts))
    # The config's order section (aging, guard, preemption bounds) with the policies set here.
    sjf = config.order.model_copy(update={"policy": "sjf", "predictor_path": str(predictor_dir)})
    groups = [(order, [p for p in opts.policies if p.startswith("srpt") == (order.policy == "srpt")])
              for order in (sjf, sjf.model_copy(update={"policy": "srpt"}))]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    channel = EngineChannel.create()  # the guard's and preemption's counters; its budget stays unlimited
    os.environ[ENV_ENGINE_CHANNEL] = str(channel.path)
    kwargs = engine_kwargs(config)
    kwargs.update(max_num_seqs=opts.max_num_seqs, enable_prefix_caching=False)
    kwargs.pop("disable_log_stats", None)
    engine = None
    parts: dict[str, list[PolicyResult]] = {}
    per_round: list[dict[str, Any]] = []
    orderings: dict[str, Any] = {}
    workload = None
    t_start = time.monotonic()
    try:
        from vllm import LLM

        for k, order, policies in round_schedule(groups, opts.rounds):
            os.environ[ENV_ENGINE_ORDER] = order.model_dump_json()
            on_progress(f"length bench: round {k + 1}/{opts.rounds}: starting an engine on {source} "
                        f"({opts.max_num_seqs} slots, order {order.policy})")
            engine = LLM(model=source, **kwargs).llm_engine
            if workload is None:
                probe = build_workload(test.prompts, test.tokens, rate_per_s=1.0, opts=opts)
                capacity, ttft_alone_ms = _capacity_req_s(engine, probe, opts)
                rate = opts.load * capacity
                workload = build_workload(test.prompts, test.tokens, rate_per_s=rate, opts=opts)
                slices = round_slices(workload, opts.rounds)
                ttft_target_ms = opts.ttft_factor * ttft_alone_ms
                on_progress(f"length bench: capacity {capacity:.2f} chat req/s, arrivals at {rate:.2f}/s "
                            f"(CV {opts.cv}), TTFT alone {ttft_alone_ms:.0f} ms -> target {ttft_target_ms:.0f} ms; "
                            f"{len(workload)} requests per policy in {len(slices)} rounds")

            def counter(name: str) -> Callable[[], int]:
                return lambda: int(channel.counters().get(name, 0))

            def busy_s() -> float:
                return float(channel.counters().get("step_time_s_total", 0.0))

            for policy in policies:
                if policy not in orderings:  # one per policy for the whole run: it keeps learning
                    if policy == "fcfs":
                        orderings[policy] = None
                    elif policy in ("sjf", "srpt"):
                        orderings[policy] = LengthOrdering(order, predictor)
                    else:
                        orderings[policy] = LengthOrdering(
                            order, _TablePredictor(predictions_for(policy, workload, seed=opts.seed)))
                preempted = counter("num_chat_preempted_total")()
                tokens_before, busy_before = counter("num_online_tokens_total")(), busy_s()
                began_s = time.monotonic() - t_start
                res = _run_policy(engine, f"{policy}-r{k + 1}", slices[k], orderings[policy], opts,
                                  counter("num_guard_promotions"), on_progress)
                res.policy = policy
                res.num_chat_preempted = counter("num_chat_preempted_total")() - preempted
                res.chat_tokens_computed = counter("num_online_tokens_total")() - tokens_before
                res.busy_s = busy_s() - busy_before
                parts.setdefault(policy, []).append(res)
                row = summarize(res, ttft_target_ms=ttft_target_ms)
                per_round.append({"round": k + 1, "policy": policy, "began_s": began_s,
                                  "num_requests": row["num_requests"], "e2e_mean_ms": row["e2e_mean_ms"],
                                  "ttft_mean_ms": row["ttft_mean_ms"], "num_chat_preempted": res.num_chat_preempted})
                on_progress(f"length bench: round {k + 1} {policy}: e2e mean {row['e2e_mean_ms']:.0f} ms, "
                            f"p99 {row['e2e_p99_ms']:.0f} ms, {res.num_chat_preempted} chat preemptions")
            engine.engine_core.shutdown()
            engine = None
    finally:
        # Also on Ctrl-C: the engine core is a process of its own and would outlive this one.
        if engine is not None:
            engine.engine_core.shutdown()
        channel.close(unlink=True)
        os.environ.pop(ENV_ENGINE_CHANNEL, None)
    results = [summarize(pooled(parts[p]), ttft_target_ms=ttft_target_ms) for p in opts.policies if p in parts]
    rows = with_ratios(results)
    doc = {"kind": "length-scheduling-bench", "options": asdict(opts), "model": project_path(source),
           "predictor": project_path(str(predictor_dir)), "predictor_meta": predictor.meta.get("val"),
           "capacity_req_s": capacity, "rate_per_s": rate, "ttft_alone_ms": ttft_alone_ms,
           "ttft_target_ms": ttft_target_ms, "results": rows, "per_round": per_round}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    plot(rows, out / "length-bench.png")
    return doc


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(x - 0.2, [r["e2e_mean_ms"] / 1000 for r in rows], 0.4, label="mean")
    axes[0].bar(x + 0.2, [r["e2e_p99_ms"] / 1000 for r in rows], 0.4, label="p99")
    axes[0].set_title("chat end-to-end latency (s)")
    axes[0].legend()
    axes[1].bar(x, [r["attainment"] for r in rows], color="tab:green")
    axes[1].errorbar(x, [r["attainment"] for r in rows],
                     yerr=[[r["attainment"] - r["attainment_wilson_low"] for r in rows], [0] * len(rows)],
                     fmt="none", color="black", capsize=3)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("TTFT attainment (Wilson 95% low)")
    axes[2].bar(x, [r["offline_output_tok_s"] for r in rows], color="tab:orange")
    axes[2].set_title("offline output tokens/s")
    for ax in axes:
        ax.set_xticks(x, names, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
