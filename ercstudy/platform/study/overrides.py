"""Overrides from the command line: `ercstudy run STUDY.yaml base.erc.alpha=0.5 search.num_trials=8`.

Each override is `dotted.path=value`, the value read as YAML (numbers as people write them, `[8, 16]` a list,
`{type: float, low: 0, high: 1}` a mapping). The path walks the file's mappings; under a mapping whose keys are
themselves dotted (search.params, search.arms' points), the longest key that matches is taken, so that
`search.params.erc.alpha.high=1.5` reaches the `erc.alpha` param. The overridden file is then validated exactly as
a file is: a mistyped key gets the same "did you mean".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from ercstudy.trainables.config import load_yaml
from ercstudy.trainables.validation import ConfigError


def parse_override(text: str) -> tuple[str, Any]:
    """`path=value` -> (path, the value read as YAML)."""
    path, eq, value = text.partition("=")
    if not eq or not path.strip() or any(not part for part in path.strip().split(".")):
        raise ConfigError("", f"override {text!r}: expected dotted.key=value, e.g. base.erc.alpha=0.5")
    try:
        return path.strip(), load_yaml(value) if value.strip() else None
    except Exception as err:
        raise ConfigError(path.strip(), f"override {text!r}: its value is not YAML: {str(err).splitlines()[0]}") from None


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` in the nested mappings of `data`, making the mappings it lacks."""
    node, parts = data, path.split(".")
    while True:
        if not isinstance(node, dict):
            raise ConfigError(path, f"override: {'.'.join(path.split('.')[:-len(parts)])} is not a mapping, cannot set a key in it")
        matched = next((j for j in range(len(parts), 0, -1) if ".".join(parts[:j]) in node), 0)
        if not matched:  # a new key: one dotted key under a mapping of dotted keys, else nested mappings
            dotted = any("." in str(k) for k in node)
            matched = len(parts) if dotted or len(parts) == 1 else 1
            if matched < len(parts):
                node[parts[0]] = {}
        key = ".".join(parts[:matched])
        if matched == len(parts):
            node[key] = value
            return
        node, parts = node[key], parts[matched:]


def apply_overrides(data: Any, overrides: Sequence[str]) -> Any:
    """A copy of the parsed file `data` with every override set, in order."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        raise ConfigError("", "overrides need a file whose top level is a mapping")
    out = copy.deepcopy(data)
    for text in overrides:
        set_path(out, *parse_override(text))
    return out
