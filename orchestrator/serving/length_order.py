"""The replica's side of length-aware ordering: predict each request's reply length from its
prompt and turn it into the request's ordering level (`orchestrator.engine.order`).

One `LengthOrdering` per replica holds the predictor (loaded once), the online corrector (a
per-template bias learned from this replica's own completions) and the quality monitor whose
trust in [0, 1] scales the levels: as live rank correlation falls the levels merge toward FCFS.
The engine's scheduler enforces the starvation guard; vLLM's priority queue does the ordering.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from latency_model.length.online import OnlineCorrector, QualityMonitor, template_key
from orchestrator.config import OrderConfig
from orchestrator.engine.order import priority_level
from orchestrator.names import ENV_ENGINE_ORDER
from orchestrator.request_class import RequestClass

log = logging.getLogger("ray.serve")


def order_env(order: OrderConfig) -> dict[str, str]:
    """The order section for the replica and its engine (predictor path made absolute)."""
    if order.predictor_path:
        from pathlib import Path

        order = order.model_copy(update={"predictor_path": str(Path(order.predictor_path).resolve())})
    return {ENV_ENGINE_ORDER: order.model_dump_json()}


def prompt_text(request: Any) -> str:
    """The text a length predictor reads: the user turns of a chat request (its first one is what
    the predictor was trained on; later ones follow it), or a completion request's prompt."""
    messages = getattr(request, "messages", None)
    if messages is None:
        prompt = getattr(request, "prompt", "")
        return prompt if isinstance(prompt, str) else " ".join(map(str, prompt or ()))
    parts = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        if role != "user":
            continue
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: keep the text ones
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


class LengthOrdering:
    def __init__(self, cfg: OrderConfig, predictor=None) -> None:
        self.cfg = cfg
        self.predictor = predictor
        self.corrector = OnlineCorrector()
        self.monitor = QualityMonitor()

    @classmethod
    def from_env(cls) -> LengthOrdering:
        raw = os.environ.get(ENV_ENGINE_ORDER)
        cfg = OrderConfig.model_validate_json(raw) if raw else OrderConfig()
        predictor = None
        if cfg.predictor_path and (cfg.policy != "fcfs" or cfg.offline_policy == "short_first_under_chat"):
            from latency_model.length.predictor import load_predictor

            predictor = load_predictor(cfg.predictor_path)
            log.info("colocate: ordering %s/%s by predicted length (%s)", cfg.policy, cfg.offline_policy,
                     cfg.predictor_path)
        return cls(cfg, predictor)

    def uses_predictions(self, request_class: RequestClass) -> bool:
        if self.predictor is None:
            return False
        if request_class is RequestClass.ONLINE:
            return self.cfg.policy != "fcfs"
        return self.cfg.offline_policy == "short_first_under_chat"  # prefix_sharing reads prompts, not lengths

    def predict(self, text: str, key: str | None = None) -> tuple[float, float]:
        """(the predictor's median, the same after the online correction), in tokens."""
        from latency_model.length.predictor import predict_median

        raw = float(predict_median(self.predictor, [text])[0])
        return raw, float(self.corrector.adjust([key or template_key(text)], [raw])[0])

    def level(self, request_class: RequestClass, text: str,
              key: str | None = None) -> tuple[int, tuple[float, float] | None]:
        """(ordering level, `predict`'s pair, or None when this class is not length-ordered)."""
        if not self.uses_predictions(request_class):
            return 0, None
        raw, predicted = self.predict(text, key)
        # The offline side orders by the same levels (its "fcfs" policy never gets here); the
        # online policy name only says which class is length-ordered.
        cfg = self.cfg if request_class is RequestClass.ONLINE else self.cfg.model_copy(update={"policy": "sjf"})
        return priority_level(predicted, self.monitor.trust(), cfg), (raw, predicted)

    def observe(self, text: str, prediction: tuple[float, float], actual_tokens: int,
                key: str | None = None) -> None:
        """A request finished with `actual_tokens`: the monitor and the corrector both judge the
        predictor's own (raw) output. (The monitor ranks predictions made over its whole window;
        corrected ones made early and late sit on scales the corrector moved in between, and in a
        bench whose lengths are scaled that mix read as tau 0 for a tau-0.35 predictor.)"""
        raw, _ = prediction
        self.monitor.observe(raw, actual_tokens)
        self.corrector.observe(key or template_key(text), raw, actual_tokens)

    def status(self) -> dict[str, Any]:
        return {"policy": self.cfg.policy, "offline_policy": self.cfg.offline_policy,
                "predictor": self.cfg.predictor_path if self.predictor is not None else None,
                "live_tau": self.monitor.tau(), "trust": self.monitor.trust(),
                "num_observed": self.monitor.num_samples}
