"""Who may call the OpenAI endpoint, and as which request class.

Optional API keys (`serve.auth`): every key has a name and the request classes it may claim.
A request must carry `Authorization: Bearer <key>` (401 without a valid one); a request that
claims a class its key does not allow is refused (403), and one that claims none is given its
key's first class, so a batch key's requests are offline without saying so and can never jump
the chat queue, while a chat key cannot send work that the controller would not meter as chat.
Keys are held as SHA-256 digests only (a keys file may name a key's digest, or the environment
variable that holds the key). Without keys, the endpoint serves loopback clients only, unless
`serve.auth.allow_remote_without_keys` says the network in front of it does the checking.

Everything here is pure: the ingress's ASGI middleware (orchestrator.serving.ingress) applies it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.request_class import REQUEST_CLASS_FIELD, RequestClass, parse_request_class

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyEntry(BaseModel):
    """One key of a keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    key_sha256: str | None = None
    """SHA-256 hex digest of the key (`colocate auth new-key` prints one)."""
    key_env: str | None = Field(None, min_length=1)
    """Or: the environment variable (of the process that builds the application) holding the key."""
    classes: list[RequestClass] = Field(default_factory=lambda: [RequestClass.ONLINE], min_length=1)
    """Request classes the key may claim; the first is what a request that claims none gets."""

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_sha256 and key_env")
        if self.key_sha256 is not None and not _HEX64.match(self.key_sha256):
            raise ValueError("key_sha256 must be 64 lowercase hex digits (the key's SHA-256)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must not repeat")
        return self


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> KeysFile:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        return self


class AuthError(ValueError):
    """A keys file or variable that is not valid; the message names the field and the reason."""


@dataclass(frozen=True)
class KeyGrant:
    name: str
    sha256: str
    classes: tuple[RequestClass, ...]


@dataclass(frozen=True)
class Refusal(Exception):
    """Why a request may not go on: an OpenAI-style error to answer with."""

    status_code: int
    message: str

    @property
    def kind(self) -> str:
        return "AuthenticationError" if self.status_code == 401 else "PermissionDeniedError"

    def body(self) -> dict[str, Any]:
        code = "invalid_api_key" if self.status_code == 401 else "permission_denied"
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": code}}


def parse_keys(text: str, source: str, environ: Mapping[str, str] | None = None) -> tuple[KeyGrant, ...]:
    """Grants from a keys document (YAML or JSON, `keys: [...]`); AuthError names what is wrong."""
    environ = os.environ if environ is None else environ
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise AuthError(f"{source}: not valid YAML: {err}") from None
    try:
        parsed = KeysFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise AuthError(f"{source}: {where}: {first['msg']}") from None
    grants = []
    for i, entry in enumerate(parsed.keys):
        if entry.key_env is not None:
            key = environ.get(entry.key_env, "").strip()
            if not key:
                raise AuthError(f"{source}: keys.{i}.key_env: variable {entry.key_env} is not set or empty")
            digest = key_digest(key)
        else:
            digest = entry.key_sha256
        grants.append(KeyGrant(entry.name, digest, tuple(entry.classes)))
    return tuple(grants)


@dataclass(frozen=True)
class HttpAccess:
    grants: tuple[KeyGrant, ...] = ()
    loopback_only: bool = True
    """Applies when there are no keys: then only loopback clients are served."""

    @property
    def keyed(self) -> bool:
        return bool(self.grants)

    @classmethod
    def from_config(cls, auth, base_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> HttpAccess:
        """From `serve.auth` (orchestrator.config.AuthConfig); reads its file and variable now."""
        environ = os.environ if environ is None else environ
        grants: list[KeyGrant] = []
        if auth.keys_file is not None:
            path = Path(auth.keys_file).expanduser()
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            try:
                text = path.read_text()
            except OSError as err:
                raise AuthError(f"serve.auth.keys_file: cannot read {path}: {err.strerror or err}") from None
            grants += parse_keys(text, str(path), environ)
        if auth.keys_env is not None:
            text = environ.get(auth.keys_env, "")
            if not text.strip():
                raise AuthError(f"serve.auth.keys_env: variable {auth.keys_env} is not set or empty")
            grants += parse_keys(text, f"${auth.keys_env}", environ)
        names = [g.name for g in grants]
        if len(set(names)) != len(names):
            raise AuthError("serve.auth: a key name appears in both keys_file and keys_env")
        return cls(tuple(grants), loopback_only=not auth.allow_remote_without_keys)

    def to_kwargs(self) -> dict[str, Any]:
        return {"grants": [[g.name, g.sha256, [c.value for c in g.classes]] for g in self.grants],
                "loopback_only": self.loopback_only}

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> HttpAccess:
        kwargs = kwargs or {}
        grants = tuple(KeyGrant(name, digest, tuple(RequestClass(c) for c in classes))
                       for name, digest, classes in kwargs.get("grants", ()))
        return cls(grants, loopback_only=bool(kwargs.get("loopback_only", True)))

    def authenticate(self, authorization: str | None, client_host: str | None) -> KeyGrant | None:
        """The caller's grant (None on an unkeyed endpoint); raises Refusal."""
        if not self.grants:
            if self.loopback_only and not is_loopback_host(client_host):
                raise Refusal(403, "this endpoint has no API keys configured (serve.auth) and serves "
                                   f"loopback clients only; {client_host} is not one")
            return None
        if not authorization:
            raise Refusal(401, "missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Refusal(401, "malformed Authorization header: expected 'Bearer <key>'")
        digest = key_digest(key.strip())
        # Every digest is compared, so the time taken does not tell which one was close.
        matches = [hmac.compare_digest(digest, g.sha256) for g in self.grants]
        if not any(matches):
            raise Refusal(401, "invalid API key")
        return self.grants[matches.index(True)]

    def bind_class(self, grant: KeyGrant | None, body: Any) -> Any:
        """The body with the request class its key allows (unchanged without keys); raises
        Refusal when it claims another. A body that is not an object is left for the route to
        reject (400), as is a class value that is not a class at all."""
        if grant is None or not isinstance(body, dict):
            return body
        claimed = body.get(REQUEST_CLASS_FIELD)
        if claimed is None:
            return {**body, REQUEST_CLASS_FIELD: grant.classes[0].value}
        try:
            request_class = parse_request_class(claimed)
        except ValueError:
            return body
        if request_class not in grant.classes:
            allowed = ", ".join(c.value for c in grant.classes)
            raise Refusal(403, f"API key {grant.name!r} may not send {REQUEST_CLASS_FIELD} "
                               f"{request_class.value!r} (it may send: {allowed})")
        return body


def new_key_entry(name: str, classes: list[RequestClass]) -> tuple[str, str]:
    """A fresh random key and the keys-file entry (YAML) that grants it: the key is shown once."""
    import secrets

    key = "colo-" + secrets.token_urlsafe(32)
    entry = {"name": name, "key_sha256": key_digest(key), "classes": [c.value for c in classes]}
    return key, yaml.safe_dump({"keys": [entry]}, sort_keys=False)


def body_json(raw: bytes) -> Any:
    """The parsed body, or None when it is not JSON (the route answers that with a 400)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
