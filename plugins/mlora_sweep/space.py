"""A sweep's search space: grid axes and sampled ranges over the template job's keys.

``space`` maps a dotted job key (``train.lr``, ``adapter.r``) to either a list (a grid
axis: every trial takes the values in turn) or one sampled distribution:
``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int: [lo, hi]}`` or
``{choice: [...]}``. Trial ``n`` takes grid point ``n mod (grid size)`` (grid points in
:func:`itertools.product` order over the axes as written) and the sampler's values for the
sampled keys.

Optuna stores a parameter only as a number, a string, a bool or null, so values that are
lists (``adapter.target_modules``) travel as their JSON text (:func:`encode` / :func:`decode`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mlora_core.config.schema import JobConfig

#: Sampled distributions by name.
SAMPLED = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Axis:
    """One key of the space: a grid axis (``values``) or a sampled distribution (``kind``)."""

    key: str
    #: ``grid`` or one of :data:`SAMPLED`.
    kind: str
    #: The grid's or ``choice``'s values; ``[lo, hi]`` for the ranges.
    values: tuple[Any, ...]

    @property
    def sampled(self) -> bool:
        return self.kind != "grid"

    def distribution(self) -> BaseDistribution:
        """The Optuna distribution of the axis (a grid axis: its values, as categories)."""
        if self.kind in ("grid", "choice"):
            return CategoricalDistribution([encode(v) for v in self.values])
        lo, hi = self.values
        if self.kind == "int":
            return IntDistribution(int(lo), int(hi))
        return FloatDistribution(float(lo), float(hi), log=self.kind == "loguniform")

    def describe(self) -> str:
        """How the value is chosen, for tables (``[4, 8, 16]``, ``loguniform(0.0001, 0.003)``)."""
        if self.kind == "grid":
            return json.dumps(list(self.values))
        if self.kind == "choice":
            return f"choice({', '.join(json.dumps(v) for v in self.values)})"
        return f"{self.kind}({self.values[0]}, {self.values[1]})"


@dataclass(frozen=True)
class SearchSpace:
    axes: tuple[Axis, ...]

    @property
    def grid(self) -> tuple[Axis, ...]:
        return tuple(a for a in self.axes if not a.sampled)

    @property
    def sampled(self) -> tuple[Axis, ...]:
        return tuple(a for a in self.axes if a.sampled)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid axes' values (one empty point when there is no grid)."""
        keys = [a.key for a in self.grid]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(a.values for a in self.grid))]

    def grid_point(self, number: int) -> dict[str, Any]:
        """Trial ``number``'s grid values, encoded as Optuna stores them."""
        points = self.grid_points()
        return {k: encode(v) for k, v in points[number % len(points)].items()}

    def distributions(self) -> dict[str, BaseDistribution]:
        return {a.key: a.distribution() for a in self.axes}

    def extremes(self) -> list[tuple[str, Any]]:
        """(key, value) for every grid value, every choice and both ends of every range: the
        values validation tries on the template."""
        out = []
        for axis in self.axes:
            values = axis.values if axis.kind != "int" else tuple(int(v) for v in axis.values)
            out += [(axis.key, v) for v in values]
        return out


def encode(value: Any) -> Any:
    """A value as Optuna can store it: lists and mappings as JSON text."""
    return json.dumps(value) if isinstance(value, list | dict | tuple) else value


def decode(axis: Axis, stored: Any) -> Any:
    """The value a trial's job gets for ``axis`` from what Optuna stored."""
    if axis.kind in ("grid", "choice"):
        for value in axis.values:
            if encode(value) == stored:
                return value
    return stored


def parse_space(raw: Mapping[str, Any]) -> tuple[SearchSpace, list[str]]:
    """The space from the config's ``space`` mapping, and every problem (``space.<key>: ...``)."""
    axes, problems = [], []
    for key, spec in raw.items():
        where = f"space.{key}"
        problem = _key_problem(str(key))
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        axis, problem = _axis(str(key), spec)
        if problem:
            problems.append(f"{where}: {problem}")
        elif axis is not None:
            axes.append(axis)
    if not raw:
        problems.append("space: name at least one template key to search over (e.g. train.lr: [1.0e-4, 3.0e-4])")
    return SearchSpace(tuple(axes)), problems


def _axis(key: str, spec: Any) -> tuple[Axis | None, str | None]:
    if isinstance(spec, list):
        if not spec:
            return None, "an empty list gives no trials; list at least one value"
        return Axis(key, "grid", tuple(spec)), None
    if not isinstance(spec, Mapping) or len(spec) != 1:
        return None, (f"expected a list (a grid axis) or one of {{{': [...]}, {'.join(SAMPLED)}: [...]}}, got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in SAMPLED:
        return None, f"unknown distribution {kind!r}; known: {', '.join(SAMPLED)}"
    if not isinstance(values, list) or not values:
        return None, f"{kind}: expected a list of values, got {values!r}"
    if kind == "choice":
        return Axis(key, kind, tuple(values)), None
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None, f"{kind}: expected [low, high] numbers, got {values!r}"
    lo, hi = values
    if lo > hi:
        return None, f"{kind}: low {lo} is above high {hi}"
    if kind == "loguniform" and lo <= 0:
        return None, f"loguniform: low must be above 0, got {lo}"
    if kind == "int" and (int(lo) != lo or int(hi) != hi):
        return None, f"int: expected whole numbers, got {values!r}"
    return Axis(key, kind, (lo, hi)), None


def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a key of a job's settings (None: it is one)."""
    if key in ("name", "priority", "start_step"):
        return f"{key!r} is set by the sweep, not searched"
    node: Any = JobConfig
    for i, part in enumerate(key.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else None
        if fields is None or part not in fields:
            known = ", ".join(fields) if fields else "nothing (it is a value)"
            prefix = ".".join(key.split(".")[:i]) or "a job"
            return f"not a job key; {prefix} has: {known}"
        node = _field_type(node, part)
    if dataclasses.is_dataclass(node):
        return "names a section; search over one of its keys (e.g. " + f"{key}.{dataclasses.fields(node)[0].name})"
    return None


def _field_type(cls: Any, name: str) -> Any:
    """The dataclass type of a nested section (``adapter``, ``train``), or None for a value."""
    value = getattr(cls(), name, None)
    return type(value) if dataclasses.is_dataclass(value) else None


def trial_job(template: Mapping[str, Any], space: SearchSpace, params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The template job (plain data) with a trial's parameters set and its own name."""
    job: dict[str, Any] = json.loads(json.dumps(template))  # a deep copy of plain data
    for axis in space.axes:
        set_key(job, axis.key, decode(axis, params[axis.key]))
    job["name"] = name
    return job


def set_key(job: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings."""
    *sections, last = key.split(".")
    node = job
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value
