"""Who may load what: model sources a client off this machine may ask for.

A model directory is read with the server's rights, so a remote client that could name any path could make the
server read (and try to parse) any file it can see. Remote clients therefore get the built-in sources ('demo',
'synthetic:<preset>') and hub ids, and filesystem paths only inside an allowed models directory that the
operator configured (`python app.py --models-dir DIR`); there a bare name means DIR/name. Clients on the
loopback address are the operator and may load any path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError
from engine.loader import SYNTHETIC_PREFIX, is_hub_id

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class AccessDeniedError(ModelLoadError):
    """A remote client asked for a model source it may not load."""


def is_loopback(host: str | None) -> bool:
    """True for this machine's own addresses (127.0.0.0/8, ::1, 'localhost'); False for anything else or None."""
    if not host:
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SourcePolicy:
    """Which sources a remote client may load. `models_dir`: the one directory remote clients may load from."""

    models_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.models_dir is not None:
            resolved = Path(self.models_dir).expanduser().resolve()
            if not resolved.is_dir():
                raise ModelLoadError(f"The allowed models directory {self.models_dir} is not a directory: create it "
                                     "or point --models-dir at the directory that holds the model folders.")
            object.__setattr__(self, "models_dir", resolved)

    def resolve(self, source: str, *, remote: bool) -> str:
        """The source to load for this client, or AccessDeniedError. Local clients get `source` unchanged."""
        if not remote or not isinstance(source, str):
            return source
        name = source.strip()
        if name == "demo" or name.startswith(SYNTHETIC_PREFIX):
            return name
        if is_hub_id(name) and not Path(name).exists():
            return name  # a hub id: read from the Hugging Face cache, never from a path the client names
        if self.models_dir is None:
            raise AccessDeniedError(
                f"Loading a model from a filesystem path ({name!r}) is refused for clients on other machines: the "
                "server has no allowed models directory. Load 'demo', a 'synthetic:<preset>' or a hub id, or ask "
                "the operator to start the app with --models-dir DIR and put the model there.")
        path = Path(name).expanduser()
        path = (path if path.is_absolute() else self.models_dir / path).resolve()  # symlinks and '..' resolved
        if not path.is_relative_to(self.models_dir):
            raise AccessDeniedError(
                f"{name!r} is outside the allowed models directory {self.models_dir}: clients on other machines may "
                f"load only the models in it. Pick one of: {', '.join(self.models()) or '(it holds no model yet)'}.")
        return str(path)

    def models(self) -> list[str]:
        """The model folders (holding a config.json) in the allowed directory, by name."""
        if self.models_dir is None:
            return []
        return sorted(p.name for p in self.models_dir.iterdir()
                      if (p / "config.json").is_file() and p.resolve().is_relative_to(self.models_dir))


__all__ = ["AccessDeniedError", "SourcePolicy", "is_loopback"]
