"""`colocate profile | interference ...` commands, registered with the core CLI through the `colocate.commands`
entry point (pyproject.toml): the core never imports the profiler, the profiler builds on the core."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from orchestrator.cli.main import DEFAULT_CONFIG, _echo, _load


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        out: Path = typer.Option(..., "--out", help="Step dataset (Parquet) to write."),
        config: str | None = typer.Option(None, "--config", "-c", help=f"Config YAML (default {DEFAULT_CONFIG})."),
        scenarios: int = typer.Option(60, "--scenarios", help="Scenarios in the sweep (5 corners + random draws)."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Drive an engine built like the replicas through a sweep of batch compositions; record every step."""
        from profiler.sweep import profile as run_profile

        cfg = _load(config)
        summary = run_profile(cfg, out, num_scenarios=scenarios, seed=seed, on_progress=_echo)
        typer.echo(json.dumps(summary, indent=2))


    @app.command()
    def interference(
        out: Path = typer.Option(Path("results/interference.json"), "--out", help="Profile file the controller reads."),
        plot: Path = typer.Option(Path("results/interference.png"), "--plot", help="PNG of p99 TTFT/TPOT vs offline load."),
        config: str | None = typer.Option(None, "--config", "-c", help=f"Config YAML (default {DEFAULT_CONFIG})."),
        rate: float = typer.Option(1.0, "--rate", help="Online chat requests per second."),
        duration_s: float = typer.Option(30.0, "--duration-s", help="Seconds of chat per measured point."),
        trace: Path | None = typer.Option(None, "--trace", help="Azure-format CSV (default: the shared Azure conv trace)."),
        max_seqs: int = typer.Option(32, "--max-seqs", help="Largest offline load to try (sequences per replica)."),
        ttft_p99_ms: float | None = typer.Option(None, "--ttft-p99-ms", help="Default: the SLO file's target."),
        tpot_p99_ms: float | None = typer.Option(None, "--tpot-p99-ms", help="Default: the SLO file's target."),
    ) -> None:
        """Search the largest offline load (and per-step latency budget) at which the chat SLO holds."""
        from orchestrator.control.slo import SloError, load_slo
        from profiler.interference import run_interference

        cfg = _load(config)
        if ttft_p99_ms is None or tpot_p99_ms is None:
            try:
                targets = load_slo(cfg.controller.slo_path, {cfg.model.id}).models[cfg.model.id]
            except SloError as err:
                _echo(f"error: {err}")
                raise typer.Exit(2) from None
            ttft_p99_ms = ttft_p99_ms or targets.ttft_p99_ms
            tpot_p99_ms = tpot_p99_ms or targets.tpot_p99_ms
        try:
            doc = run_interference(cfg, ttft_p99_ms=ttft_p99_ms, tpot_p99_ms=tpot_p99_ms, rate_per_s=rate,
                                   duration_s=duration_s, trace=trace, max_seqs=max_seqs, out=out, plot=plot,
                                   on_progress=_echo)
        except RuntimeError as err:
            _echo(f"error: {err}")
            raise typer.Exit(1) from None
        typer.echo(f"largest offline load meeting TTFT p99 <= {ttft_p99_ms} ms and TPOT p99 <= {tpot_p99_ms} ms: "
                   f"{doc['offline_seqs']} seq/replica ({doc['offline_tokens_per_s']:.1f} tok/s); "
                   f"per-step budget {doc['step_budget_ms']} ms")
        typer.echo(f"profile: {out}  plot: {plot}")

    @app.command("bench-predict")
    def bench_predict(
        model_dir: Path = typer.Argument(..., help="Model directory written by `colocate train`."),
        candidates: int = typer.Option(64, "--candidates", help="Candidate batches per call."),
        repeats: int = typer.Option(2000, "--repeats"),
        out: Path | None = typer.Option(None, "--out", help="Also write the numbers as JSON here."),
    ) -> None:
        """Measure what one prediction call and one candidate cost (XGBoost and the compiled trees)."""
        from latency_model.model import ModelFileError, load
        from profiler.bench_predict import benchmark, format_report

        try:
            model = load(model_dir)
        except ModelFileError as err:
            _echo(f"error: {err}")
            raise typer.Exit(2) from None
        report = benchmark(model, num_candidates=candidates, repeats=repeats)
        typer.echo(format_report(report))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
