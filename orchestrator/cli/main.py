"""`colocate` command line: model building and the stack's lifecycle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from orchestrator.config import ColocateConfig, ConfigError, load_config

app = typer.Typer(help="Colocate: online chat and offline batch inference on the same vLLM replicas.",
                  no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Build local models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
slo_app = typer.Typer(help="Operators' SLO targets (manifests/slo.yaml), applied without a restart.",
                      no_args_is_help=True)
app.add_typer(slo_app, name="slo")
auth_app = typer.Typer(help="API keys of the OpenAI endpoint (serve.auth).", no_args_is_help=True)
app.add_typer(auth_app, name="auth")

DEFAULT_CONFIG = "manifests/colocate.yaml"


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _load(config_path: str | None, address: str | None = None) -> ColocateConfig:
    """Load the config or exit 2 with the field path and reason, before anything starts."""
    path = config_path
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    try:
        config = load_config(path)
    except ConfigError as err:
        _echo(f"error: {err}")
        raise typer.Exit(2) from None
    if address:
        config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"address": address})})
    return config


@auth_app.command("new-key")
def auth_new_key(
    name: str = typer.Option(..., "--name", help="A name for the key (shown in refusals and logs)."),
    classes: list[str] = typer.Option(["online"], "--class",
                                      help="Request class the key may send (repeat; the first is its default)."),
    keys_file: Path | None = typer.Option(None, "--append-to", help="Add the entry to this keys file."),
) -> None:
    """Make a random API key: the key is printed once (stdout); the keys-file entry holds only
    its SHA-256."""
    import yaml

    from orchestrator.request_class import parse_request_class
    from orchestrator.serving.auth import AuthError, new_key_entry, parse_keys

    try:
        parsed = [parse_request_class(c) for c in classes]
    except ValueError as err:
        _echo(f"error: --class: {err}")
        raise typer.Exit(2) from None
    key, entry = new_key_entry(name, parsed)
    if keys_file is not None:
        existing = yaml.safe_load(keys_file.read_text()) if keys_file.exists() else None
        merged = {"keys": [*((existing or {}).get("keys") or []), *yaml.safe_load(entry)["keys"]]}
        text = yaml.safe_dump(merged, sort_keys=False)
        try:
            parse_keys(text, str(keys_file), environ={})  # names unique, entries valid (key_env aside)
        except AuthError as err:
            if "is not set" not in str(err):
                _echo(f"error: {err}")
                raise typer.Exit(2) from None
        tmp = keys_file.with_suffix(keys_file.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(keys_file)
        _echo(f"added key {name!r} to {keys_file}")
    else:
        _echo(entry.rstrip())
    typer.echo(key)


@model_app.command("tiny")
def model_tiny(
    out: Path = typer.Option(..., "--out", help="Directory to write the model into."),
    size: str = typer.Option("test", "--size", help="test (fastest) or bench (~60M params)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build a seeded random-weight Llama model with a locally trained tokenizer."""
    from orchestrator.models.tiny import SIZES, build_tiny_model

    if size not in SIZES:
        _echo(f"error: --size must be one of {sorted(SIZES)}, got {size!r}")
        raise typer.Exit(2)
    path = build_tiny_model(out, size=size, seed=seed)
    meta = json.loads((path / "colocate_tiny.json").read_text())
    typer.echo(f"built {size} model ({meta['num_params']:,} parameters) at {path}")


@app.command()
def up(
    config: str | None = typer.Option(None, "--config", "-c", help=f"Config YAML (default {DEFAULT_CONFIG})."),
    address: str | None = typer.Option(None, "--address", help="Existing Ray cluster; none starts a local one."),
) -> None:
    """Start (or join) a Ray cluster, deploy the chat application, wait until it is healthy."""
    from orchestrator.cluster import lifecycle as cluster

    cfg = _load(config, address)
    try:
        cluster.bring_up(cfg, on_progress=_echo)
    except cluster.StackError as err:
        _echo(f"error: {err}")
        raise typer.Exit(err.exit_code) from None
    typer.echo(f"endpoint: {cfg.endpoint}")
    if cfg.replicas.engine == "emulated":
        emu = cfg.replicas.emulation
        typer.echo(f"engine: emulated ({emu.model_shape} on {emu.gpu}: a roofline model of that GPU, not a GPU)")
    if cfg.serve.grpc.enabled:
        typer.echo(f"grpc: {cfg.serve.grpc.host}:{cfg.serve.grpc.port}")


@app.command()
def down(keep_logs: bool = typer.Option(False, "--keep-logs", help="Keep the temp dir (Ray's logs) of a cluster `up` started.")) -> None:
    """Remove what `colocate up` created; stops a cluster only if `up` started it."""
    from orchestrator.cluster import lifecycle as cluster

    state = cluster.StackState.load()
    if state is None:
        typer.echo("nothing to stop: no stack was started from this directory")
        return
    for line in cluster.teardown(state, keep_logs=keep_logs):
        typer.echo(line)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The application, each replica (state, model, requests running/waiting), and the cluster."""
    from orchestrator.cluster import lifecycle as cluster

    state = cluster.StackState.load()
    if state is None:
        _echo("no stack is up (run `colocate up`)")
        raise typer.Exit(1)
    report = collect_status(state)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"cluster:     {report['cluster_address']}  (started by colocate: {report['started_cluster']})")
    typer.echo(f"endpoint:    {report['endpoint']}")
    typer.echo(f"gRPC:        {report.get('grpc_endpoint') or 'not enabled (serve.grpc.enabled)'}")
    typer.echo(f"application: {report['application']} {report['application_status']}")
    for dep in report["deployments"]:
        typer.echo(f"  {dep['name']}: {dep['status']} {dep['replica_states']}")
    typer.echo(f"{'replica':<12} {'state':<10} {'model':<20} {'running':>7} {'waiting':>7} {'kv_used':>7} "
               f"{'online':>6} {'offline':>7} {'controller':>11}")
    for r in report["replicas"]:
        typer.echo(f"{r['replica_id']:<12} {r['state']:<10} {r.get('model', '-'):<20} "
                   f"{r.get('num_running_reqs', '-'):>7} {r.get('num_waiting_reqs', '-'):>7} "
                   f"{r.get('kv_cache_usage', 0.0):>7.1%} "
                   f"{r.get('num_inflight', {}).get('online', '-'):>6} {r.get('num_inflight', {}).get('offline', '-'):>7} "
                   f"{r.get('controller', '-'):>11}")
    for r in report["replicas"]:
        if r.get("controller") in ("missing", "unreachable"):
            typer.echo(f"  replica {r['replica_id']} has no controller ({r['controller']}): it runs its "
                       "fallback offline budget; see its log")
    ctl = report.get("controller")
    if ctl is None:
        typer.echo("controller:  not running (offline work limited only by vLLM priorities)")
        return
    slo = ctl["slo"] or {}
    typer.echo(f"controller:  SLO TTFT p99 {slo.get('ttft_p99_ms')} ms, TPOT p99 {slo.get('tpot_p99_ms')} ms, "
               f"headroom {slo.get('headroom') if slo.get('headroom') is not None else 'measured'}; latency model: {'yes' if ctl['latency_model'] else 'no (default budget)'}; "
               f"step budget {ctl['step_budget_ms'] or 'from TPOT'}")
    lm = ctl.get("latency_model_status") or {}
    if lm:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        age = lm.get("age_s")
        speed = lm.get("speed_vs_prior")
        typer.echo(f"  latency model: {lm.get('source')} (learning online: {lm.get('learn_online')}); "
                   f"fit on {lm.get('num_live_steps', 0)} live steps"
                   f"{'' if age is None else f', {age:.0f} s ago'}; hold-out MAPE {pct(lm.get('holdout_mape'))}, "
                   f"live MAPE {pct(lm.get('live_mape'))}; host speed vs prior "
                   f"{'-' if speed is None else f'{speed:.2f}x'}; {lm.get('num_steps_collected', 0)} steps collected")
    if ctl.get("slo_error"):
        typer.echo(f"  SLO file rejected: {ctl['slo_error']}")
    for note in ctl.get("notes", []):
        typer.echo(f"  note: {note}")

    def ms(v):
        return "-" if v is None else f"{v:.0f}"

    typer.echo(f"{'replica':<12} {'online':>6} {'off.run':>7} {'budget':>8} {'TTFT p99 obs':>12} "
               f"{'TPOT p99 obs/pred/SLO':>22} {'throttle':>16} {'model x':>7} {'headroom':>8} {'probe':>9}")
    for r in ctl["replicas"]:
        typer.echo(f"{r['replica_id']:<12} {r['online_requests']:>6} {r['offline_running']:>7} "
                   f"{r['offline_budget_seqs']:>3}/{r['offline_budget_tokens']:<4} "
                   f"{ms(r['observed_ttft_p99_ms']):>6}/{ms(r['slo_ttft_p99_ms']):<5} "
                   f"{ms(r['observed_tpot_p99_ms']):>8}/{ms(r['predicted_step_ms'])}/{ms(r['slo_tpot_p99_ms']):<6} "
                   f"{r['throttle']:>9} x{r['throttle_scale']:.2f} {r.get('model_calibration', 1.0):>7.2f} "
                   f"{r.get('headroom') or 0.0:>8.2f} {r.get('probe_tpot', 1.0):>4.1f}/{r.get('probe_ttft', 1.0):<4.1f}")


def collect_status(state) -> dict:
    from ray import serve

    from orchestrator.cluster import lifecycle as cluster

    cluster.connect(state.address)
    app_status = serve.status().applications.get(state.app_name)
    return {
        "cluster_address": state.address,
        "dashboard_url": state.dashboard_url,
        "metrics_url": state.metrics_url,
        "started_cluster": state.started_cluster,
        "endpoint": state.endpoint,
        "grpc_endpoint": getattr(state, "grpc_endpoint", None),
        "application": state.app_name,
        "application_status": str(app_status.status.value) if app_status else "NOT_FOUND",
        "deployments": [
            {"name": name, "status": str(d.status.value), "replica_states": dict(d.replica_states)}
            for name, d in (app_status.deployments.items() if app_status else [])
        ],
        "replicas": cluster.replica_rows(state.app_name, state.address),
        "controller": controller_status(),
    }


def controller_status() -> dict | None:
    import ray

    from orchestrator.control.controller import get_controller

    try:
        return ray.get(get_controller().status.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        return None


def _slo_context(config_path: str | None):
    cfg = _load(config_path)
    return cfg, Path(cfg.controller.slo_path)


@slo_app.command("show")
def slo_show(
    config: str | None = typer.Option(None, "--config", "-c", help=f"Config YAML (default {DEFAULT_CONFIG})."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster whose controller to ask "
                                       "(default: the stack `colocate up` recorded here, if any)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The SLO file (the controller's own, when one runs), and the targets it has in force."""
    import ray

    from orchestrator.control.slo import SloError, dump_slo, load_slo, parse_slo

    handle = _running_controller(address)
    in_force = None
    if handle is not None:
        in_force = controller_status()
        shown = ray.get(handle.slo_text.remote(), timeout=30)
        path, text, file_error = shown["path"], shown.get("text"), shown.get("error")
        if text is not None:
            try:
                text = dump_slo(parse_slo(text, path))
            except SloError as err:
                text, file_error = None, str(err)
    elif address:
        _echo(f"error: no Colocate controller answers on the Ray cluster at {address}")
        raise typer.Exit(1)
    else:
        cfg, local = _slo_context(config)
        path = str(local)
        try:
            text, file_error = dump_slo(load_slo(local, {cfg.model.id})), None
        except SloError as err:
            text, file_error = None, str(err)
    if as_json:
        typer.echo(json.dumps({"path": path, "file_error": file_error, "controller": in_force}, indent=2))
        return
    typer.echo(f"# {path}")
    typer.echo(text if text is not None else f"# invalid: {file_error}")
    if in_force is not None:
        typer.echo(f"# in force in the controller for {in_force['model']}: {in_force['slo']}")
        if in_force.get("slo_error"):
            typer.echo(f"# the controller rejected the last edit: {in_force['slo_error']}")


@slo_app.command("set")
def slo_set(
    assignments: list[str] = typer.Argument(..., help="MODEL.FIELD=VALUE or FIELD=VALUE (one served model)."),
    config: str | None = typer.Option(None, "--config", "-c", help=f"Config YAML (default {DEFAULT_CONFIG})."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster whose controller to change "
                                       "(default: the stack `colocate up` recorded here, if any)."),
) -> None:
    """Change targets: validated first, then written; in force at once.

    With a running controller (the recorded stack, or `--address`) the controller edits the file
    it reads itself, on its node: the one that counts, wherever the CLI runs. Without one, the
    config's SLO file is edited here, and a controller started later reads it."""
    from orchestrator.control.slo import SloError, apply_setting, diff, load_slo, write_slo_atomically

    handle = _running_controller(address)
    if handle is not None:
        import ray

        result = ray.get(handle.edit_slo.remote(list(assignments)), timeout=30)
        if "error" in result:
            _echo(f"error: {result['error']} (the controller's file {result['path']} is unchanged)")
            raise typer.Exit(2)
        typer.echo(f"# {result['path']} (the controller's file), in force now")
        for change in result["changes"]:
            typer.echo(change)
        return
    if address:
        _echo(f"error: no Colocate controller answers on the Ray cluster at {address}")
        raise typer.Exit(1)
    cfg, path = _slo_context(config)
    try:
        old = load_slo(path, {cfg.model.id})
        new = old
        for assignment in assignments:
            new = apply_setting(new, assignment, {cfg.model.id})
    except SloError as err:
        _echo(f"error: {err}")
        raise typer.Exit(2) from None
    write_slo_atomically(path, new)
    typer.echo(f"# {path} (no controller is running; one reads this file when it starts)")
    for change in diff(old, new) or ["no change"]:
        typer.echo(change)


def _running_controller(address: str | None):
    """The controller of `address`, or of the stack recorded here; None when neither answers."""
    import ray

    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.control.controller import get_controller

    if address is None:
        state = cluster.StackState.load()
        if state is None:
            return None
        address = state.address
    try:
        cluster.connect(address)
        handle = get_controller()
        ray.get(handle.ready.remote(), timeout=10)
        return handle
    except (ValueError, ConnectionError, ray.exceptions.RayError):
        return None


def _stack_with_job_api():
    """The recorded stack, if it has a job API (a local cluster `up` started); else exit 1."""
    from orchestrator.cluster import lifecycle as cluster

    state = cluster.StackState.load()
    if state is None or not state.dashboard_url:
        _echo("error: no local stack with a job API is up (run `colocate up`), or use `ray job submit --address ...`")
        raise typer.Exit(1)
    return state


@app.command()
def submit(
    input_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="OpenAI Batch JSONL or Parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .jsonl or .parquet."),
    model: str | None = typer.Option(None, "--model"),
    weight: float = typer.Option(1.0, "--weight", min=0.001, help="Share of offline capacity relative to other jobs."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Offline requests in flight without a controller."),
    max_in_flight: int | None = typer.Option(None, "--max-in-flight", min=1,
                                             help="Upper bound on in-flight requests, also under a controller."),
) -> None:
    """Submit a batch job through Ray's job API (the same as `ray job submit ... -- python -m jobs.batch`)."""
    from orchestrator.cluster.jobs import submit_batch_job

    state = _stack_with_job_api()
    args = ["--input", str(input_path.resolve()), "--output", str(output.resolve()),
            "--endpoint", state.endpoint, "--weight", str(weight), "--concurrency", str(concurrency)]
    if model:
        args += ["--model", model]
    if max_in_flight is not None:
        args += ["--max-in-flight", str(max_in_flight)]
    job_id = submit_batch_job(state.dashboard_url, args, metadata={
        "colocate": "batch", "input": str(input_path.resolve()), "output": str(output.resolve()), "weight": str(weight)})
    typer.echo(job_id)


@app.command()
def jobs(as_json: bool = typer.Option(False, "--json")) -> None:
    """Batch jobs on the cluster with their progress (done/total, tokens/s, ETA)."""
    from ray.job_submission import JobSubmissionClient

    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.cluster.jobs import job_rows

    state = _stack_with_job_api()
    cluster.connect(state.address)
    rows = job_rows(JobSubmissionClient(state.dashboard_url).list_jobs())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'job':<28} {'status':<10} {'done/total':>12} {'tok/s':>8} {'ETA':>7}  output")
    for r in rows:
        eta = f"{r['eta_s']:.0f}s" if r.get("eta_s") is not None else "-"
        done = f"{r['done']}/{r['total']}" if r.get("total") is not None else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") is not None else "-"
        typer.echo(f"{r['job_id']:<28} {r['status']:<10} {done:>12} {tps:>8} {eta:>7}  {r.get('output') or '-'}")


@app.command()
def train(
    dataset: Path = typer.Argument(..., help="Step-telemetry Parquet dataset (latency_model.schema)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train the XGBoost step-latency model (p50 and p99 heads) and report hold-out accuracy."""
    from latency_model.model import train as train_model
    from latency_model.schema import DatasetError, read_steps

    try:
        table = read_steps(dataset)
        model, metrics = train_model(table, seed=seed)
    except (DatasetError, ValueError) as err:
        _echo(f"error: {err}")
        raise typer.Exit(2) from None
    model.save(out)
    typer.echo(f"trained on {metrics['num_steps']} steps ({metrics['num_holdout']} held out) -> {out}")
    typer.echo(f"  held out: whole blocks of consecutive steps ({metrics.get('num_groups')} blocks), "
               f"so near-duplicate steps never sit on both sides")
    typer.echo(f"  median-head MAPE        {metrics['median_mape']:.2%}")
    typer.echo(f"  p99-head coverage       {metrics['p99_coverage']:.3f}")
    typer.echo(f"  linear (HyGen) MAPE     {metrics['linear_hygen_mape']:.2%}")
    rnd = metrics.get("random_split")
    if rnd:
        typer.echo(f"  random step split (flattered): MAPE {rnd['median_mape']:.2%}, coverage "
                   f"{rnd['p99_coverage']:.3f}, linear {rnd['linear_hygen_mape']:.2%}")
    floor = metrics.get("timing_noise_floor")
    if floor is not None:
        typer.echo(f"  timing noise floor      {floor:.2%}  (same batch, consecutive steps: no model predicts single steps better)")


@app.command()
def override(
    max_offline_seqs: int | None = typer.Option(None, "--max-offline-seqs", help="Static offline sequences per replica."),
    max_offline_tokens: int | None = typer.Option(None, "--max-offline-tokens", help="Static offline tokens per step."),
    clear: bool = typer.Option(False, "--clear", help="Hand budgets back to the controller's policy."),
) -> None:
    """Pin every replica's offline budget to a static cap (or --clear it): for baselines and incidents."""
    import ray

    from orchestrator.cluster import lifecycle as cluster
    from orchestrator.control.controller import get_controller

    if clear == (max_offline_seqs is not None):
        _echo("error: give --max-offline-seqs (and optionally --max-offline-tokens), or --clear")
        raise typer.Exit(2)
    state = cluster.StackState.load()
    if state is None:
        _echo("no stack is up (run `colocate up`)")
        raise typer.Exit(1)
    cluster.connect(state.address)
    try:
        controller = get_controller()
    except ValueError:
        _echo("error: the stack has no controller (controller.enabled: false)")
        raise typer.Exit(1) from None
    budget = None
    if not clear:
        tokens = max_offline_tokens if max_offline_tokens is not None else 64 * max(max_offline_seqs, 1)
        budget = {"max_offline_seqs": [max_offline_seqs], "max_offline_tokens": [tokens]}
    try:
        ray.get(controller.set_override.remote(budget), timeout=30)
    except ValueError as err:
        _echo(f"error: {err}")
        raise typer.Exit(2) from None
    typer.echo("budgets back under the controller's policy" if clear else f"offline budget pinned to {budget}")


def register_plugins(target: typer.Typer = app) -> list[str]:
    """Add the commands that client packages (the profiler, the benchmark) register under the
    `colocate.commands` entry point. A plugin that fails to import is reported, not fatal: the
    core commands keep working."""
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group="colocate.commands"):
        try:
            ep.load()(target)
            names.append(ep.name)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take the CLI down
            _echo(f"warning: commands of {ep.name!r} ({ep.value}) unavailable: {err}")
    return names


def _add_length_commands() -> None:
    from orchestrator.cli.length import length_app

    app.add_typer(length_app, name="length")


_add_length_commands()


def main() -> None:
    from orchestrator.logs import quiet_http_client_logs

    quiet_http_client_logs()
    register_plugins()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
