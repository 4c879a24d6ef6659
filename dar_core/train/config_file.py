"""``dar train --config run.toml``: a file with the same fields as the flags.

Keys are ``TrainConfig`` field names (``lr``, ``batch_size``; ``batch-size`` is accepted too)
plus ``backend``, at the top level or under a ``[train]`` table. Flags given on the command
line override the file. The resolved config (file, then flags) is what the run records in
``config.json`` and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from dar_core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_train_toml(path: str | Path, cls: type, extra: dict[str, tuple[type, ...]]
                    ) -> dict[str, Any]:
    """The fields of ``cls`` (a dataclass) and of ``extra`` (name -> accepted types) that the
    TOML file at ``path`` sets, type-checked; a ConfigError names the file and the bad key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    if isinstance(data.get("train"), dict):
        rest = sorted(k for k in data if k != "train")
        if rest:
            raise ConfigError(f"{path}: keys {rest} sit outside the [train] table")
        data = data["train"]
    types = {f.name: _accepted(type(f.default)) for f in dataclasses.fields(cls)} | extra
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ConfigError(f"{path}: unknown key {key!r}; expected one of {sorted(types)}")
        ok = types[name]
        if isinstance(value, bool) and bool not in ok or not isinstance(value, ok):
            raise ConfigError(f"{path}: {key} must be {' or '.join(t.__name__ for t in ok)}, "
                              f"got {value!r}")
        out[name] = value
    return out


def _accepted(typ: type) -> tuple[type, ...]:
    return (int, float) if typ is float else (typ,)
