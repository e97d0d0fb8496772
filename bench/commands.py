"""`colocate bench | demo ...` commands, registered with the core CLI through the `colocate.commands`
entry point (pyproject.toml): the core never imports the benchmark, the benchmark builds on the core."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli.main import DEFAULT_CONFIG, _echo, _load


def register(app: typer.Typer) -> None:
    @app.command("bench-length")
    def bench_length(
        predictor: Path = typer.Option(..., "--predictor", help="Length predictor (`colocate length train`)."),
        data: Path = typer.Option(Path("../shared/traces/sharegpt_first_turns.parquet"), "--data",
                                  help="Parquet with prompt/response (its test split is replayed)."),
        config: str | None = typer.Option("manifests/colocate-bench.yaml", "--config", "-c"),
        num_requests: int = typer.Option(300, "--num-requests", help="Chat requests per policy."),
        load: float = typer.Option(0.8, "--load", help="Arrival rate as a share of measured chat capacity."),
        cv: float = typer.Option(2.0, "--cv", help="Coefficient of variation of inter-arrival times."),
        seed: int = typer.Option(0, "--seed"),
        policies: str | None = typer.Option(None, "--policies", help="Comma-separated subset of "
                                            "fcfs,sjf,oracle,tau0.3,tau0,adversarial,srpt,srpt-oracle."),
        rounds: int = typer.Option(3, "--rounds", min=1,
                                   help="Slices of the workload every policy serves in turn (order reversed "
                                        "every other round, so host drift weighs on all alike)."),
        max_num_seqs: int = typer.Option(8, "--max-num-seqs", min=1,
                                          help="Engine slots (fewer: requests queue for a slot, where order matters)."),
        prompt_chars: int = typer.Option(600, "--prompt-chars", min=1,
                                         help="Prompts are sent cut to this many characters (bounds prefill cost)."),
        out: Path | None = typer.Option(None, "--out", help="Results directory (default results/length-<time>)."),
    ) -> None:
        """Chat ordering policies side by side beside a batch job: FCFS, predicted shortest-first,
        the oracle and injected-error predictors on one engine, shortest-remaining-first with
        limited preemption (srpt, srpt-oracle) on a second; results.json and a PNG."""
        import time as _time

        from bench.length_sched import (
            POLICIES,
            LengthBenchOptions,
            format_rounds,
            format_table,
            run_length_bench,
        )

        cfg = _load(config)
        opts = LengthBenchOptions(num_requests=num_requests, load=load, cv=cv, seed=seed, rounds=rounds,
                                  max_num_seqs=max_num_seqs, prompt_chars=prompt_chars)
        if policies:
            chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
            unknown = [p for p in chosen if p not in POLICIES]
            if unknown:
                _echo(f"error: unknown policies {unknown}; known: {', '.join(POLICIES)}")
                raise typer.Exit(2)
            opts.policies = chosen
        if not data.is_file():
            _echo(f"error: {data}: no such file (the ShareGPT table: ../shared/traces/sharegpt_first_turns.parquet)")
            raise typer.Exit(2)
        out = out or Path("results") / f"length-{_time.strftime('%Y%m%d-%H%M%S')}"
        try:
            doc = run_length_bench(cfg, data=data, predictor_dir=predictor, out=out, opts=opts, on_progress=_echo)
        except (FileExistsError, ValueError) as err:
            _echo(f"error: {err}")
            raise typer.Exit(2) from None
        typer.echo(format_table(doc["results"]))
        typer.echo(format_rounds(doc["per_round"]))
        typer.echo(f"results: {out / 'results.json'}, plot: {out / 'length-bench.png'}")

    @app.command()
    def bench(
        config: str | None = typer.Option("manifests/colocate-bench.yaml", "--config", "-c", help="Stack config (bench model)."),
        online_trace: Path | None = typer.Option(None, "--online-trace", help="Azure-format chat trace CSV."),
        offline_trace: Path | None = typer.Option(None, "--offline-trace", help="Offline lengths CSV (arXiv format)."),
        rate: float | None = typer.Option(None, "--rate", help="Online requests per second (trace inter-arrivals "
                                          "scaled; default 0.8)."),
        duration_s: float | None = typer.Option(None, "--duration-s", help="Seconds of chat per policy run."),
        slo_tolerance: float = typer.Option(0.5, "--slo-tolerance", help="SLO = online-only p99 x (1 + this)."),
        slo_from_file: bool = typer.Option(False, "--slo-from-file", help="Use manifests/slo.yaml's targets instead."),
        static_caps: str | None = typer.Option(None, "--static-caps", help="Comma-separated static offline caps."),
        repeats: int = typer.Option(1, "--repeats", help="Repeat online-only, naive and colocate runs (medians, spread)."),
        num_offline_requests: int | None = typer.Option(None, "--num-offline-requests", min=1,
                                                        help="Requests per backlog batch job (default 4000)."),
        quick: bool = typer.Option(False, "--quick", help="Short runs and fewer baselines (about 4 minutes on 2 cores)."),
        full_lengths: bool = typer.Option(False, "--full-lengths", help="Trace lengths as recorded (capped to the "
                                          "context), for the emulated engine; default: scaled to the bench model."),
        out: Path | None = typer.Option(None, "--out", help="Results directory (default results/bench-<time>)."),
    ) -> None:
        """Replay chat and a batch job under every policy side by side; write results.json and plots."""
        import time as _time

        from bench.bench import BenchOptions, format_table, quick_options, run_bench
        from orchestrator.cluster import lifecycle as cluster

        cfg = _load(config)
        opts = quick_options() if quick else BenchOptions()
        opts.repeats = repeats
        if rate is not None:
            opts.rate_per_s = rate
        opts.online_trace, opts.offline_trace = online_trace, offline_trace
        opts.slo_tolerance = None if slo_from_file else slo_tolerance
        if duration_s is not None:
            opts.duration_s = duration_s
        if static_caps:
            opts.static_caps = tuple(int(c) for c in static_caps.split(","))
        if num_offline_requests is not None:
            opts.num_offline_requests = num_offline_requests
        opts.full_lengths = full_lengths
        out_dir = out or Path("results") / f"bench-{_time.strftime('%Y%m%d-%H%M%S')}"
        try:
            summary = run_bench(cfg, opts, out_dir, on_progress=_echo)
        except cluster.StackError as err:
            _echo(f"error: {err}")
            raise typer.Exit(1) from None
        typer.echo(format_table(summary))
        typer.echo(f"results: {out_dir / 'results.json'}  plots: {', '.join(summary['plots'])}")


    @app.command()
    def faults(
        config: str | None = typer.Option("manifests/colocate-faults.yaml", "--config", "-c",
                                          help="Stack config (two replicas, a small KV cache)."),
        out: Path = typer.Option(..., "--out", help="Results directory (must not hold a results.json)."),
        rate: float = typer.Option(0.8, "--rate", min=0.01, help="Chat requests per second (Poisson)."),
        warmup_s: float = typer.Option(30.0, "--warmup-s", min=0.0),
        phase_s: float = typer.Option(45.0, "--phase-s", min=5.0, help="Seconds watched after each fault."),
        num_batch: int = typer.Option(1000, "--num-batch", min=1, help="Requests in the batch job."),
        faults_list: str = typer.Option("driver,replica,controller,kv", "--faults",
                                        help="Comma-separated, in order, from: driver, replica, controller, kv."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Kill a replica, the controller and the job driver and fill the KV cache under chat and
        a batch job; report what each did to chat and that the job ends with one result per input."""
        from bench.faults import FAULTS, FaultsOptions, format_report, run_faults

        kinds = tuple(k.strip() for k in faults_list.split(",") if k.strip())
        unknown = sorted(set(kinds) - set(FAULTS))
        if unknown or not kinds:
            _echo(f"error: --faults: unknown {unknown or 'none given'}; choose from {', '.join(FAULTS)}")
            raise typer.Exit(2)
        if (out / "results.json").exists():
            _echo(f"error: {out / 'results.json'} exists; choose another --out")
            raise typer.Exit(2)
        cfg = _load(config)
        opts = FaultsOptions(rate_per_s=rate, warmup_s=warmup_s, phase_s=phase_s, num_batch=num_batch,
                             faults=kinds, seed=seed)
        result = run_faults(cfg, opts, out, on_progress=_echo)
        typer.echo(format_report(result))
        typer.echo(f"results: {out / 'results.json'}  plot: {result['plot']}")

    @app.command()
    def simulate(
        out: Path = typer.Option(..., "--out", help="Results directory (must not hold a results.json)."),
        config: str | None = typer.Option("manifests/colocate-bench.yaml", "--config", "-c",
                                          help="Stack config whose replicas are simulated."),
        replicas: int = typer.Option(1, "--replicas", min=1, help="Simulated replicas."),
        duration_s: float = typer.Option(380.0, "--duration-s", min=1.0, help="Seconds of chat per policy run."),
        online_trace: Path | None = typer.Option(None, "--online-trace", help="Azure-format chat trace CSV."),
        offline_trace: Path | None = typer.Option(None, "--offline-trace",
                                                  help="Offline lengths CSV (arXiv format), as the bench's."),
        rate: float = typer.Option(0.8, "--rate", min=0.001, help="Chat requests per second, whole fleet."),
        policy: str | None = typer.Option(None, "--policy", help="One policy or a comma-separated list "
                                          "(online-only, offline-only, colocate, static-N, naive); default all."),
        static_caps: str = typer.Option("1,2,4", "--static-caps", help="Static caps run with the default policies."),
        ttft_p99_ms: float | None = typer.Option(None, "--ttft-p99-ms", help="SLO (with --tpot-p99-ms); default: "
                                                 "online-only p99 x 1.5, as the bench."),
        tpot_p99_ms: float | None = typer.Option(None, "--tpot-p99-ms"),
        num_offline_requests: int = typer.Option(4000, "--num-offline-requests", min=1),
        client_overhead_ms: float = typer.Option(0.0, "--client-overhead-ms", min=0.0,
                                                 help="Serving overhead added to every chat TTFT."),
        step_scale: float = typer.Option(1.0, "--step-scale", min=0.01, help="Multiply every step time (host speed)."),
        controller_model: str = typer.Option("config", "--controller-model",
                                             help="config (the stack's model and live learning) or oracle."),
        seed: int = typer.Option(0, "--seed"),
        full_lengths: bool = typer.Option(False, "--full-lengths", help="Trace lengths as recorded (capped to the "
                                          "context) instead of the bench's scaling to a small model."),
        host_steps: Path | None = typer.Option(None, "--host-steps", help="Step dataset (`colocate profile`) or "
                                               "trained model of the host to simulate; the controller keeps its own."),
        offline_routing: str | None = typer.Option(None, "--offline-routing",
                                                   help="serve or room (default: the config's serve.offline_routing)."),
    ) -> None:
        """Simulate N replicas under the bench's policies with the production decision code;
        results.json, plots and summary.txt as `colocate bench` writes them, labelled simulated."""
        from bench.bench import format_table
        from bench.simulate import SimOptions, Simulation

        if (ttft_p99_ms is None) != (tpot_p99_ms is None):
            _echo("error: give both --ttft-p99-ms and --tpot-p99-ms, or neither")
            raise typer.Exit(2)
        if offline_routing not in (None, "serve", "room"):
            _echo(f"error: --offline-routing must be serve or room, not {offline_routing!r}")
            raise typer.Exit(2)
        if controller_model not in ("config", "oracle"):
            _echo(f"error: --controller-model must be config or oracle, not {controller_model!r}")
            raise typer.Exit(2)
        if (out / "results.json").exists():
            _echo(f"error: {out / 'results.json'} exists; choose another --out")
            raise typer.Exit(2)
        for path in (online_trace, offline_trace, host_steps):
            if path is not None and not path.exists():
                _echo(f"error: {path}: no such file")
                raise typer.Exit(2)
        cfg = _load(config)
        policies = tuple(p.strip() for p in policy.split(",") if p.strip()) if policy else None
        try:
            caps = tuple(int(c) for c in static_caps.split(",") if c.strip())
            for p in policies or ():
                if p not in ("online-only", "offline-only", "colocate", "naive") and not (
                        p.startswith("static-") and p[7:].isdigit()):
                    raise ValueError(f"unknown policy {p!r}")
        except ValueError as err:
            _echo(f"error: {err}")
            raise typer.Exit(2) from None
        opts = SimOptions(num_replicas=replicas, duration_s=duration_s, rate_per_s=rate, online_trace=online_trace,
                          offline_trace=offline_trace, policies=policies, static_caps=caps, num_offline_requests=num_offline_requests,
                          client_overhead_ms=client_overhead_ms, step_scale=step_scale,
                          controller_model=controller_model, seed=seed, full_lengths=full_lengths,
                          host_steps=host_steps, offline_routing=offline_routing,
                          slo=None if ttft_p99_ms is None else {"ttft_p99_ms": ttft_p99_ms, "tpot_p99_ms": tpot_p99_ms})
        summary = Simulation(cfg, opts, out, on_progress=_echo).run()
        typer.echo(format_table(summary))
        typer.echo(f"results: {out / 'results.json'}  plots: {', '.join(summary['plots'])}")

    @app.command()
    def plan(
        config: str | None = typer.Option("manifests/colocate-emulated.yaml", "--config", "-c",
                                          help="Stack config to plan replicas for."),
        online_trace: Path | None = typer.Option(None, "--online-trace", help="Azure-format chat trace CSV "
                                                 "(its length distribution and burstiness)."),
        rate: float = typer.Option(2.0, "--rate", min=0.001, help="Chat requests per second per replica."),
        ttft_p99_ms: float | None = typer.Option(None, "--ttft-p99-ms", help="SLO (with --tpot-p99-ms); default: "
                                                 "the config's SLO file."),
        tpot_p99_ms: float | None = typer.Option(None, "--tpot-p99-ms"),
        duration_s: float = typer.Option(240.0, "--duration-s", min=10.0, help="Simulated chat seconds per "
                                         "candidate (>= 300 requests resolve a 99% target)."),
        seqs: str = typer.Option("16,32,64,128,256", "--seqs", help="max_num_seqs candidates."),
        chunks: str = typer.Option("256,512,1024,2048,4096", "--chunks", help="max_num_batched_tokens candidates."),
        out: Path | None = typer.Option(None, "--out", help="Directory for plan.json, plan.yaml and the runs "
                                        "(default results/plan-<time>)."),
        host_steps: Path | None = typer.Option(None, "--host-steps", help="Step dataset or trained model of the "
                                               "host to plan for (a CPU config needs one: its speed is the host's)."),
        bench_lengths: bool = typer.Option(False, "--bench-lengths", help="Scale the trace's lengths to a small "
                                           "model's context as `colocate bench` does (default: as recorded)."),
    ) -> None:
        """Choose per-replica max_num_seqs, max_num_batched_tokens and the chat slot share from a
        trace's lengths and the SLO, by a monotone search over the simulator; prints the config
        fragment with its predicted offline throughput and attainment."""
        import time as _time

        from bench.plan import PlanOptions, config_fragment, run_plan

        if (ttft_p99_ms is None) != (tpot_p99_ms is None):
            _echo("error: give both --ttft-p99-ms and --tpot-p99-ms, or neither")
            raise typer.Exit(2)
        for path in (online_trace, host_steps):
            if path is not None and not path.exists():
                _echo(f"error: {path}: no such file")
                raise typer.Exit(2)
        try:
            seq_list = tuple(int(v) for v in seqs.split(",") if v.strip())
            chunk_list = tuple(int(v) for v in chunks.split(",") if v.strip())
        except ValueError as err:
            _echo(f"error: --seqs/--chunks take comma-separated integers ({err})")
            raise typer.Exit(2) from None
        out = out or Path("results") / f"plan-{_time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "plan.json").exists():
            _echo(f"error: {out / 'plan.json'} exists; choose another --out")
            raise typer.Exit(2)
        opts = PlanOptions(rate_per_s=rate, duration_s=duration_s, online_trace=online_trace,
                           slo=None if ttft_p99_ms is None else {"ttft_p99_ms": ttft_p99_ms, "tpot_p99_ms": tpot_p99_ms},
                           seq_candidates=seq_list, chunk_candidates=chunk_list, host_steps=host_steps,
                           full_lengths=not bench_lengths)
        result = run_plan(_load(config), opts, out, on_progress=_echo)
        typer.echo(config_fragment(result))
        typer.echo(f"plan: {out / 'plan.json'}, {out / 'plan.yaml'}")

    @app.command()
    def demo(
        config: str | None = typer.Option(None, "--config", "-c", help=f"Config YAML (default {DEFAULT_CONFIG})."),
        duration_s: float = typer.Option(45.0, "--duration-s", help="Seconds of chat beside the batch job."),
        reference_s: float | None = typer.Option(None, "--reference-s", help="Seconds of the trace replayed alone "
                                                 "first (the SLO is 1.5 x its p99 TTFT and TPOT); default: the "
                                                 "co-located window's own requests."),
        chat_rate: float = typer.Option(1.0, "--chat-rate", help="Mean chat requests per second."),
        num_offline: int = typer.Option(5000, "--num-offline", help="Requests in the batch job: a backlog that "
                                        "outlasts the chat, stopped with it (its results so far are kept)."),
        scenarios: int = typer.Option(30, "--scenarios", help="Scenarios in this host's engine profile."),
        out: Path | None = typer.Option(None, "--out", help="Output directory (default .colocate/demo/<time>)."),
        keep: bool = typer.Option(False, "--keep", help="Leave the stack running afterwards (`colocate down`)."),
    ) -> None:
        """The main job: profile this host's engine, bring the stack up, run chat and a batch job together, summarize."""
        from bench.demo import DemoOptions, format_summary, run_demo
        from orchestrator.cluster import lifecycle as cluster

        cfg = _load(config)
        opts = DemoOptions(duration_s=duration_s, chat_rate_per_s=chat_rate, num_offline=num_offline,
                           reference_s=reference_s, profile_scenarios=scenarios, keep=keep, out_dir=out)
        try:
            summary = run_demo(cfg, opts)
        except (cluster.StackError, FileNotFoundError, RuntimeError, TimeoutError) as err:
            _echo(f"error: {str(err) or 'interrupted'}")
            raise typer.Exit(getattr(err, "exit_code", 1)) from None
        typer.echo(format_summary(summary))
        paths = summary["paths"]
        typer.echo(f"  plot            {paths['plot']}")
        typer.echo(f"  summary         {paths['summary']}")
        typer.echo(f"  log             {paths['log']}")
        if keep:
            typer.echo(f"  stack           still up at {summary['endpoint']} (`colocate down` stops it)")
        if summary["chat"]["num_ok"] == 0 or summary["batch"]["num_ok"] == 0 or summary["batch"]["status"] == "FAILED":
            raise typer.Exit(1)
