"""Job configs: a dataclass read from --config FILE.toml, then --field flags."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path


def parse_config(cls, argv, prog: str, description: str):
    """cls(**TOML values, **flag overrides).validate(); one flag per dataclass field.

    Raises ValueError for an unreadable file or unknown keys."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help=f"TOML file with {cls.__name__} fields")
    for f in dataclasses.fields(cls):
        flag, kind = f"--{f.name.replace('_', '-')}", type(f.default)
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind is tuple:
            p.add_argument(flag, dest=f.name, default=None, type=lambda s: tuple(int(v) for v in s.split(",")))
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=None)
    args = vars(p.parse_args(list(argv)))
    values = {}
    if path := args.pop("config"):
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from None
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    values.update({k: v for k, v in args.items() if v is not None})
    return cls(**values).validate()
