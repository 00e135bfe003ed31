"""Parameter sweeps: a ``[sweep]`` table in labq.toml makes one upload a group of jobs.

::

    args = ["--lr={lr}", "--seed={seed}"]

    [sweep]
    seed = [1, 2, 3]
    lr = [0.1, 0.01]

makes six jobs, one per combination (in the order the table lists names and values).
Each job gets the values as environment variables (``seed=1``, ``lr=0.1``) and every
``{name}`` of a swept name in its ``args`` replaced by the value; other braces stay as
they are. The server caps the number of combinations (``LABQ_MAX_GROUP_SIZE``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from typing import Any

from labq.shared.errors import ManifestError
from labq.shared.manifest import JobSpec, check_env_name

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int | float):
        return str(value)
    raise ManifestError(f"sweep values of {name} must be strings or numbers, got {value!r}",
                        field="sweep")


def combinations(table: Any, max_size: int) -> list[dict[str, str]]:
    """Every combination of the ``[sweep]`` table, validated; [] when there is no sweep."""
    if table is None:
        return []
    if not isinstance(table, dict) or not table:
        raise ManifestError('sweep must be a table of name = [values], e.g. seed = [1, 2, 3]',
                            field="sweep")
    names, choices = [], []
    total = 1
    for name, values in table.items():
        check_env_name(name, field="sweep")
        if not isinstance(values, list) or not values:
            raise ManifestError(f"sweep {name} must be a non-empty list of values",
                                field="sweep")
        names.append(name)
        choices.append([_value(name, v) for v in values])
        total *= len(values)
    if total > max_size:
        raise ManifestError(
            f"the sweep makes {total} jobs; this server allows at most {max_size} in one "
            "group (LABQ_MAX_GROUP_SIZE)", field="sweep", maximum=max_size)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def apply(spec: JobSpec, combo: dict[str, str]) -> JobSpec:
    """The spec of one member: the values in its env and in its args' placeholders."""

    def fill(arg: str) -> str:
        return _PLACEHOLDER.sub(lambda m: combo.get(m.group(1), m.group(0)), arg)

    return replace(spec, args=[fill(a) for a in spec.args], env={**spec.env, **combo})


def member_name(name: str, combo: dict[str, str]) -> str:
    label = ",".join(f"{k}={v}" for k, v in combo.items())
    return f"{name}[{label}]"[:200]
