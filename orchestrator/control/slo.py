"""Operators' SLO targets (`manifests/slo.yaml`): validated, hot-reloaded, last good kept.

    kind: ColocateSLO
    version: 1
    models:
      colocate-tiny:            # the served model id
        ttft_p99_ms: 1500       # > 0
        tpot_p99_ms: 200        # > 0
        headroom: null          # optional override, [0, 0.9]; null: measured per replica
        max_offline_seqs: null  # optional caps on any replica's offline budget
        max_offline_tokens: null

`SloWatcher.poll()` re-reads the file when its modification time, size or existence changes. An
invalid file (unparsable YAML, unknown key, wrong type, target <= 0, no targets for the served
model, deleted) is
rejected with the field path and reason and the last good targets stay in force. Every accepted
change is returned with its old and new values, for the log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.config import format_validation_error
from orchestrator.control.policy import SloTargets


class ModelSlo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ttft_p99_ms: float = Field(gt=0)
    tpot_p99_ms: float = Field(gt=0)
    headroom: float | None = Field(None, ge=0, le=0.9)
    """Share of each target kept free of predicted step time. None (the default): derived per
    replica from the measured gap between its chat steps and its observed TPOT p99
    (`orchestrator.control.policy.derived_headroom`); a number overrides it."""
    max_offline_seqs: int | None = Field(None, ge=0)
    max_offline_tokens: int | None = Field(None, ge=0)

    def targets(self) -> SloTargets:
        return SloTargets(self.ttft_p99_ms, self.tpot_p99_ms, self.headroom, self.max_offline_seqs,
                          self.max_offline_tokens)


class SloFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["ColocateSLO"] = "ColocateSLO"
    version: Literal[1] = 1
    models: dict[str, ModelSlo] = Field(min_length=1)


class SloError(ValueError):
    """An SLO file or change that cannot be used; the message names the field and the reason."""


def parse_slo(text: str, source: str, served_models: set[str] | None = None) -> SloFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SloError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SloError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    # YAML integers are fine for millisecond targets; strict mode would refuse them as floats.
    for entry in (data.get("models") or {}).values() if isinstance(data.get("models"), dict) else ():
        if isinstance(entry, dict):
            for key in ("ttft_p99_ms", "tpot_p99_ms", "headroom"):
                if type(entry.get(key)) is int:
                    entry[key] = float(entry[key])
    try:
        slo = SloFile.model_validate(data)
    except ValidationError as err:
        raise SloError(format_validation_error(err, source)) from None
    if served_models is not None:
        # One file may carry targets for several deployments; the served model must have its own.
        missing = sorted(served_models - set(slo.models))
        if missing:
            raise SloError(f"{source}: models: no targets for the served model {missing[0]!r} "
                           f"(the file has {sorted(slo.models)})")
    return slo


def load_slo(path: str | Path, served_models: set[str] | None = None) -> SloFile:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SloError(f"{p}: file not found") from None
    except OSError as err:
        raise SloError(f"{p}: cannot read: {err.strerror or err}") from None
    return parse_slo(text, str(p), served_models)


def dump_slo(slo: SloFile) -> str:
    return yaml.safe_dump(slo.model_dump(mode="json"), sort_keys=False)


def apply_setting(slo: SloFile, assignment: str, served_models: set[str] | None = None) -> SloFile:
    """`MODEL.FIELD=VALUE` (or `FIELD=VALUE` when one model is configured), validated."""
    if "=" not in assignment:
        raise SloError(f"{assignment!r}: expected KEY=VALUE, e.g. tpot_p99_ms=150")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) == 1:
        if len(slo.models) != 1:
            raise SloError(f"{key}: several models are configured; use MODEL.{key}")
        parts = [next(iter(slo.models)), parts[0]]
    if len(parts) != 2:
        raise SloError(f"{key}: expected MODEL.FIELD or FIELD")
    model, field = parts
    data = slo.model_dump(mode="json")
    if model not in data["models"]:
        if served_models is None or model not in served_models:
            raise SloError(f"models.{model}: unknown model (configured: {sorted(data['models'])})")
        data["models"][model] = {}
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    data["models"][model][field] = value
    return parse_slo(yaml.safe_dump(data), f"{key}={raw}", served_models)


def write_slo_atomically(path: str | Path, slo: SloFile) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(dump_slo(slo))
    os.replace(tmp, p)


def diff(old: SloFile | None, new: SloFile) -> list[str]:
    """Human-readable changes, `models.M.field: old -> new`."""
    out = []
    old_models = old.models if old else {}
    for model in sorted(set(old_models) | set(new.models)):
        a = old_models[model].model_dump() if model in old_models else {}
        b = new.models[model].model_dump() if model in new.models else {}
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                out.append(f"models.{model}.{field}: {a.get(field)} -> {b.get(field)}")
    return out


class SloWatcher:
    """Keeps the last good SLO file in force; `poll()` picks up edits."""

    def __init__(self, path: str | Path, served_models: set[str] | None = None,
                 last_good: SloFile | None = None) -> None:
        self.path = Path(path)
        self.served_models = served_models
        self.current: SloFile | None = last_good
        self.last_error: str | None = None
        self._stamp: tuple | None = None

    def _file_stamp(self) -> tuple:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return ("missing",)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> tuple[list[str], str | None]:
        """(accepted changes, new error) since the last poll; both empty when nothing changed."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return [], None
        self._stamp = stamp
        try:
            new = load_slo(self.path, self.served_models)
        except SloError as err:
            message = f"{err}; keeping the last good targets" if self.current else str(err)
            self.last_error = message
            return [], message
        self.last_error = None
        changes = diff(self.current, new)
        self.current = new
        return changes, None

    def targets(self, model: str) -> SloTargets | None:
        if self.current is None or model not in self.current.models:
            return None
        return self.current.models[model].targets()
