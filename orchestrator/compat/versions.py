"""The one version check both fences (`vllm_api`, `ray_api`) run at import."""

from __future__ import annotations

import logging

from orchestrator.names import ENV_ALLOW_UNTESTED

log = logging.getLogger(__name__)


def check_tested(library: str, version: str, tested: tuple[str, ...], what_we_use: str,
                 allow_untested: bool = False) -> None:
    """Raise ImportError unless `version` of `library` is on a tested release line (major.minor
    in `tested`), or untested versions are allowed (then a warning is logged). `what_we_use` says
    in the message why the version matters."""
    if any(version == t or version.startswith(t + ".") for t in tested):
        return
    message = (f"Colocate was tested with {library} {', '.join(t + '.x' for t in tested)}; {library} {version} "
               f"is installed. Colocate uses {what_we_use}, which change between releases: install a tested "
               f"version, or set {ENV_ALLOW_UNTESTED}=1 to try this one")
    if allow_untested:
        log.warning("%s (continuing: %s=1)", message, ENV_ALLOW_UNTESTED)
        return
    raise ImportError(message)
