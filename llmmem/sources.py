"""Where a model comes from (a local directory, a .gguf file, a preset, a hub id), decided without torch.

Every command resolves its models while it validates its input, before torch is imported or anything is
loaded, so a missing path, an unknown preset or a hub id while offline is one line at once. A preset that
is built locally (the testbed) is built only when asked (``fetch=True``), after everything else was checked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmmem.config import ConfigError, ModelSpec, model_display_name
from llmmem.presets import PRESETS, fetch_preset, hub_reachable

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class Source:
    kind: str  # "dir" | "gguf" | "hub" | "memory"
    path: str  # directory, hub id
    gguf_file: str | None = None
    display_name: str = ""


def _display(p: Path) -> str:
    return model_display_name(str(p))


def resolve(spec: ModelSpec, fetch: bool = True) -> Source:
    """Decide where a model comes from, raising ConfigError for anything that cannot load.

    A preset is fetched or built into ``$LLMMEM_HOME/models`` when ``fetch`` (saying so); with
    ``fetch=False`` its directory is returned whether it exists yet or not."""
    name = str(spec.name)
    if name in PRESETS:
        path = fetch_preset(name) if fetch else PRESETS.get(name).local_dir()
        return Source("dir", str(path), None, name)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir():
            if spec.gguf_file:
                if not (p / spec.gguf_file).is_file():
                    raise ConfigError(f"gguf_file={spec.gguf_file!r} not found in {p}")
                return Source("gguf", str(p), spec.gguf_file, _display(p))
            if not (p / "config.json").is_file():
                ggufs = sorted(x.name for x in p.glob("*.gguf"))
                hint = f" (it holds {ggufs[0]}: pass model_args gguf_file={ggufs[0]})" if ggufs else ""
                raise ConfigError(f"{p} has no config.json: not a Hugging Face checkpoint directory{hint}")
            return Source("dir", str(p), None, _display(p))
        if p.suffix == ".gguf":
            return Source("gguf", str(p.parent), p.name, _display(p))
        raise ConfigError(f"--model {name!r} is a file but not a .gguf file or a checkpoint directory")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _HUB_ID.match(name)
    if looks_like_path or name.endswith(".gguf"):
        raise ConfigError(f"model path {name!r} does not exist")
    if not _HUB_ID.match(name) and "/" not in name:
        if not hub_reachable():
            raise ConfigError(
                f"unknown model {name!r}: not a preset ({', '.join(PRESETS.names())}), "
                "not a local path, and the hub is unreachable"
            )
        return Source("hub", name, spec.gguf_file, name)
    if not hub_reachable():
        raise ConfigError(
            f"hub id {name!r} cannot be loaded: the Hugging Face hub is unreachable (offline). "
            f"Use a local checkpoint directory or a preset ({', '.join(PRESETS.names())})"
        )
    return Source("hub", name, spec.gguf_file, name)


def check_model(spec: ModelSpec) -> Source:
    """Validation of a model before anything loads: resolvable, and a preset not fetched or built yet."""
    return resolve(spec, fetch=False)


def needs_build(spec: ModelSpec) -> bool:
    """A preset not fetched or built yet (``ensure_model`` makes it, saying so)."""
    name = str(spec.name)
    return name in PRESETS and not (PRESETS.get(name).local_dir() / "config.json").exists()


def ensure_model(spec: ModelSpec) -> Source:
    """After validation: fetch or build a preset that is not there yet (a no-op for everything else)."""
    return resolve(spec, fetch=True)
