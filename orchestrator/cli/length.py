"""`colocate length train | eval`: the output-length predictor (latency_model.length)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


length_app = typer.Typer(help="Output-length prediction: train a predictor on (prompt, reply) pairs, evaluate it.",
                         no_args_is_help=True)


def _counter(tokenizer: Path | None, config: str | None):
    """Token counts in the served model's tokenizer: --tokenizer, else the config's model (the
    seeded tiny model is built first when the config says so)."""
    from latency_model.length.data import tokenizer_counter

    if tokenizer is None:
        from orchestrator.config import load_config
        from orchestrator.serving.app import resolve_model_source

        # ConfigError is a ValueError: the commands report it like any bad input.
        tokenizer = Path(resolve_model_source(load_config(config or _default_config())))
    return tokenizer, tokenizer_counter(tokenizer)


DEFAULT_CONFIG = "manifests/colocate.yaml"
"""As the core CLI's default: the project's config when run from its root."""


def _default_config() -> str | None:
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


@length_app.command("train")
def train(
    data: Path = typer.Argument(..., help="Parquet with prompt and response columns (id decides the split)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the predictor into (must not hold one)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Model directory whose tokenizer counts "
                                          "the labels (default: the config's served model)."),
    config: str | None = typer.Option(None, "--config", "-c"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a predictor already at --out."),
) -> None:
    """Fit the proxy length predictor on the train split; report the validation split."""
    from latency_model.length.data import load_table
    from latency_model.length.predictor import LengthModelError
    from latency_model.length.train import train_predictor

    if (out / "meta.json").exists() and not overwrite:
        _echo(f"error: {out} already holds a length predictor; pass --overwrite to replace it")
        raise typer.Exit(2)
    try:
        tok_dir, count = _counter(tokenizer, config)
        table = load_table(data, count)
        predictor = train_predictor(table, source={"data": str(data), "tokenizer": str(tok_dir)})
    except (LengthModelError, FileNotFoundError, ValueError) as err:
        _echo(f"error: {err}")
        raise typer.Exit(2) from None
    predictor.save(out, overwrite=overwrite)
    meta = predictor.meta
    typer.echo(f"trained on {meta['num_rows']['train']} rows ({meta['fit_s']} s); validation "
               f"({meta['num_rows']['val']} rows): kendall_tau {_fmt(meta['val']['kendall_tau'])}, "
               f"bucket_accuracy {_fmt(meta['val']['bucket_accuracy'])}, "
               f"mae_tokens {meta['val']['mae_tokens']:.1f}; saved to {out}")


@length_app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(..., help="A predictor from `colocate length train`."),
    data: Path = typer.Argument(..., help="Parquet with prompt and response columns."),
    split: str = typer.Option("test", "--split", help="train, val, test (by id, as in training) or all."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Default: the tokenizer it was trained with."),
    config: str | None = typer.Option(None, "--config", "-c"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """kendall_tau, bucket_accuracy and mae_tokens of the predictor beside a prompt-length-only and
    a constant baseline."""
    from latency_model.length.data import load_table
    from latency_model.length.predictor import LengthModelError, load_predictor
    from latency_model.length.train import evaluate as run_eval

    if split not in ("train", "val", "test", "all"):
        _echo(f"error: --split must be train, val, test or all, got {split!r}")
        raise typer.Exit(2)
    try:
        predictor = load_predictor(model_dir)
        if tokenizer is None and predictor.meta.get("source", {}).get("tokenizer"):
            tokenizer = Path(predictor.meta["source"]["tokenizer"])
        _, count = _counter(tokenizer, config)
        result = run_eval(predictor, load_table(data, count), split=split)
    except (LengthModelError, FileNotFoundError, ValueError) as err:
        _echo(f"error: {err}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['num_rows']} rows ({split} split); buckets at {[round(e) for e in result['bucket_edges_tokens']]} tokens")
    typer.echo(f"{'':16}{'kendall_tau':>12}{'bucket_accuracy':>17}{'mae_tokens':>12}")
    for name in ("predictor", "prompt_length", "constant"):
        r = result[name]
        typer.echo(f"{name:16}{_fmt(r['kendall_tau']):>12}{_fmt(r['bucket_accuracy']):>17}{r['mae_tokens']:>12.1f}")
    p = result["predictor"]
    typer.echo(f"predictor p90 coverage {p['p90_coverage']:.3f}, {p['cost_ms_per_prompt']:.3f} ms per prompt in one batch")
