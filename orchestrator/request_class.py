"""Request classes: every request is `online` (interactive chat) or `offline` (batch work).

The class is set explicitly by whoever submits the request, in the request body's
`request_class` field; it is never inferred from the prompt or the client. A request without the
field is chat, the default the OpenAI API's own clients get.
"""

from __future__ import annotations

from enum import Enum

REQUEST_CLASS_FIELD = "request_class"


class RequestClass(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"


# vLLM's priority scheduler runs lower values first; online work always sorts ahead of offline.
# Within a class, the level (orchestrator.engine.order: the predicted reply length's, 0 for
# FCFS) orders requests; levels stay below NUM_LEVELS, so the classes never interleave.
NUM_LEVELS = 1000
_PRIORITY_BASE = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: NUM_LEVELS}


def vllm_priority(request_class: RequestClass, level: int = 0) -> int:
    """The vLLM priority of a request of this class at this ordering level (0 <= level < NUM_LEVELS).
    `vllm_priority(OFFLINE)` is the smallest offline priority: `priority >= it` tests the class."""
    if not 0 <= level < NUM_LEVELS:
        raise ValueError(f"ordering level must be in [0, {NUM_LEVELS}), got {level}")
    return _PRIORITY_BASE[request_class] + level


def level_of(priority: int) -> int:
    """The ordering level inside a vLLM priority (the inverse of `vllm_priority`'s level)."""
    return priority % NUM_LEVELS


def parse_request_class(value: object) -> RequestClass:
    """Map the body field to a class. None (field absent) is online; anything unknown is an error."""
    if value is None:
        return RequestClass.ONLINE
    if isinstance(value, RequestClass):
        return value
    if isinstance(value, str):
        try:
            return RequestClass(value)
        except ValueError:
            pass
    known = ", ".join(repr(c.value) for c in RequestClass)
    raise ValueError(f"'{REQUEST_CLASS_FIELD}' must be one of {known}, got {value!r}")


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
"""The message roles of OpenAI's chat completions API."""


def validate_messages(messages: object) -> None:
    """Raise ValueError (answered with a 400) for a chat message whose role OpenAI does not have:
    OpenAI rejects `"role": "wizard"`, and a model's chat template would otherwise render it."""
    for i, message in enumerate(messages or ()):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in CHAT_ROLES:
            known = ", ".join(sorted(CHAT_ROLES))
            raise ValueError(f"messages[{i}].role must be one of {known}, got {role!r}")
