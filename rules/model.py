"""Rule files: the pydantic model of ``rules/packs/*.yaml`` and ``/etc/agentd/rules.d/*.yaml``.

A file::

    pack: coolant                       # optional name of the pack
    description: ...
    params:                             # site parameters with their defaults; a site overrides
      tcs_supply_max_c: 45              # them (Engine(..., params={...})) without editing the pack
    rules:
      - name: tcs_supply_hot            # unique over every loaded file
        scope: coolant                  # node | gpu (one instance per GPU) | coolant
        when: coolant.tcs.supply_temp_c > params.tcs_supply_max_c
        for: 30s                        # must hold this long before firing (default 0s)
        clear_when: coolant.tcs.supply_temp_c < params.tcs_supply_max_c - 2   # default: not when
        clear_for: 2m                   # must hold this long before resolving (default 0s)
        severity: warning               # info | warning | critical
        stale: fire                     # ignore | fire | resolve (default: fire for coolant scope)
        actions:
          - {type: cap_gpu, fraction: 0.8}
          - {type: advise, advice: no_new_work}

Loading reports every error at once, each located as
``file: rules[2] (gpu_hot): when: unknown signal 'gpu.tmp_c' at column 1`` (the style of
``agentd check-config``). Numeric action fields take a number or a ``params.NAME`` reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from collectors.durations import format_duration, parse_duration_s  # noqa: F401  (rules' public names)
from rules.expr import BOOL, NUMBER, Expr, ExprError, parse_expr, value_type

_PARAM_REF_RE = re.compile(r"^params\.([A-Za-z_][A-Za-z0-9_]*)$")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


NumberOrParam = float | str


def _check_num_or_param(v: Any) -> Any:
    if isinstance(v, str) and not _PARAM_REF_RE.match(v):
        raise ValueError("expected a number or a parameter reference such as 'params.cap_w'")
    return v


class CapGpu(_Strict):
    """Cap each GPU the rule covers (its own GPU for ``scope: gpu``; every GPU otherwise).

    Exactly one of:
      - ``watts``: an absolute ceiling;
      - ``fraction``: of the GPU's max power limit (``gpu.limit_max_w``), e.g. 0.7; a small one
        (0.01) means "the device minimum" after clamping;
      - ``delta_w`` (negative): below the GPU's *enforced* limit at the moment the rule started
        firing (``gpu.limit_w``, else ``gpu.limit_max_w`` when unknown), latched for as long as it
        fires. Latched, not re-read each tick: re-reading would ratchet the limit down every tick.
    """

    type: Literal["cap_gpu"]
    watts: NumberOrParam | None = None
    fraction: NumberOrParam | None = None
    delta_w: NumberOrParam | None = None

    @field_validator("watts", "fraction", "delta_w")
    @classmethod
    def _chk(cls, v: Any) -> Any:
        return _check_num_or_param(v)

    @model_validator(mode="after")
    def _exactly_one(self) -> CapGpu:
        given = [k for k in ("watts", "fraction", "delta_w") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of watts, fraction, delta_w"
                             + (f" (got {', '.join(given)})" if given else ""))
        check_action_numbers(self, {})
        return self


class CapNode(_Strict):
    """A node-wide ceiling on the sum of the GPUs' limits, split across the node's GPUs
    (by job class: ``rules.budget.split_node_budget`` through ``compose_with_sources``; with every
    GPU ``normal``, the max-min fair equal split)."""

    type: Literal["cap_node"]
    watts: NumberOrParam
    split: Literal["equal"] = "equal"

    @field_validator("watts")
    @classmethod
    def _chk(cls, v: Any) -> Any:
        return _check_num_or_param(v)

    @model_validator(mode="after")
    def _check(self) -> CapNode:
        check_action_numbers(self, {})
        return self


class Advise(_Strict):
    """Advice for the scheduler adapter: ``no_new_work`` (stop placing jobs) or ``drain``."""

    type: Literal["advise"]
    advice: Literal["no_new_work", "drain"]


class EventOnly(_Strict):
    """Only record the transitions (every rule does; this says "and nothing else" explicitly)."""

    type: Literal["event"]


Action = Annotated[CapGpu | CapNode | Advise | EventOnly, Field(discriminator="type")]
ACTION_TYPES = ("cap_gpu", "cap_node", "advise", "event")


def check_action_numbers(action: BaseModel, params: dict[str, Any]) -> None:
    """Range-check an action's numbers; ``params.*`` are resolved from ``params`` when present
    (unresolvable references are skipped here and checked when the pack is loaded/bound)."""

    def val(v: Any) -> Any:
        if isinstance(v, str):
            m = _PARAM_REF_RE.match(v)
            return params.get(m.group(1)) if m else None
        return v

    if isinstance(action, CapGpu):
        w, f, d = val(action.watts), val(action.fraction), val(action.delta_w)
        if w is not None and not w > 0:
            raise ValueError(f"watts must be > 0 (got: {w})")
        if f is not None and not 0 < f <= 1:
            raise ValueError(f"fraction must be in (0, 1] (got: {f})")
        if d is not None and not d < 0:
            raise ValueError(f"delta_w must be negative: watts below the limit at firing time (got: {d})")
    elif isinstance(action, CapNode):
        w = val(action.watts)
        if w is not None and not w > 0:
            raise ValueError(f"watts must be > 0 (got: {w})")


def resolve_number(v: float | str | None, params: dict[str, Any]) -> float | None:
    if v is None or not isinstance(v, str):
        return v
    m = _PARAM_REF_RE.match(v)
    assert m is not None
    return float(params[m.group(1)])


Scope = Literal["node", "gpu", "coolant"]
Severity = Literal["info", "warning", "critical"]
StalePolicy = Literal["ignore", "fire", "resolve"]


class Rule(_Strict):
    name: str
    scope: Scope
    when: str
    for_: float = Field(0.0, alias="for")
    clear_when: str | None = None
    clear_for: float = 0.0
    severity: Severity = "warning"
    stale: StalePolicy | None = None
    description: str = ""
    actions: list[Action] = Field(default_factory=list)

    _when_expr: Expr | None = PrivateAttr(None)
    _clear_expr: Expr | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("a rule name starts with a letter and holds letters, digits, _ . : -")
        return v

    @field_validator("for_", "clear_for", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration_s(v)

    @model_validator(mode="after")
    def _default_stale(self) -> Rule:
        if self.stale is None:
            # Coolant inputs fail safe: a stale coolant reading is never read as OK.
            self.stale = "fire" if self.scope == "coolant" else "ignore"
        return self

    @property
    def when_expr(self) -> Expr:
        assert self._when_expr is not None, "rule was not loaded through rules.model"
        return self._when_expr

    @property
    def clear_expr(self) -> Expr | None:
        return self._clear_expr


class RuleFile(_Strict):
    pack: str | None = None
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


@dataclass(slots=True, frozen=True)
class ParamDecl:
    name: str
    type: str
    default: Any
    source: str


@dataclass(slots=True)
class RuleSet:
    """Rules loaded (and type-checked) from one or more files, with their declared params."""

    rules: list[Rule] = field(default_factory=list)
    params: dict[str, ParamDecl] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # rule name -> "file: rules[i]"
    files: list[str] = field(default_factory=list)

    def resolve_params(self, overrides: dict[str, Any] | None = None,
                       source: str = "site params") -> dict[str, Any]:
        """Pack defaults with the site's ``overrides`` on top; unknown names and wrong types are
        errors (RuleLoadError), as are action numbers that the new values put out of range."""
        values = {n: d.default for n, d in self.params.items()}
        errors: list[str] = []
        for name, v in (overrides or {}).items():
            decl = self.params.get(name)
            if decl is None:
                known = ", ".join(sorted(self.params)) or "none"
                errors.append(f"{source}: params.{name}: no loaded rule pack declares this parameter "
                              f"(declared: {known}) (got: {v!r})")
                continue
            t = value_type(v)
            if t != decl.type:
                errors.append(f"{source}: params.{name}: expected a {decl.type} as declared in "
                              f"{decl.source} (got: {v!r})")
                continue
            values[name] = float(v) if t == NUMBER else v
        if not errors:
            for rule in self.rules:
                for i, action in enumerate(rule.actions):
                    try:
                        check_action_numbers(action, values)
                    except ValueError as exc:
                        errors.append(f"{source}: {self.sources.get(rule.name, rule.name)} ({rule.name}): "
                                      f"actions[{i}]: {exc}")
        if errors:
            raise RuleLoadError(errors)
        return values


class RuleLoadError(Exception):
    """Rule files are invalid; ``errors`` holds every located message."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    skip_next_tag = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            skip_next_tag = True
            continue
        if skip_next_tag and part in ACTION_TYPES:
            skip_next_tag = False
            continue  # pydantic puts the union tag in the location
        skip_next_tag = False
        if part == "for_":
            part = "for"
        out += ("." if out else "") + str(part)
    return out


def _message(err: Mapping[str, Any]) -> str:
    typ, msg = err["type"], err["msg"]
    if typ == "extra_forbidden":
        return "unknown key (check the spelling)"
    if typ == "missing":
        return "missing (required)"
    if typ == "union_tag_invalid":
        return f"unknown action type (one of {', '.join(ACTION_TYPES)})"
    if typ == "union_tag_not_found":
        return f"an action needs 'type:' (one of {', '.join(ACTION_TYPES)})"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _rule_label(data: Any, i: int) -> str:
    name = data[i].get("name") if isinstance(data, list) and i < len(data) and isinstance(data[i], dict) else None
    return f"rules[{i}] ({name})" if isinstance(name, str) else f"rules[{i}]"


def _validation_errors(exc: ValidationError, source: str, data: dict[str, Any]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            where = _rule_label(data.get("rules"), loc[1])
            rest = _loc_text(loc[2:])
            if rest.startswith("["):
                rest = rest  # never happens for rules; kept for clarity
            prefix = f"{source}: {where}: {rest}: " if rest else f"{source}: {where}: "
        else:
            key = _loc_text(loc) or "(top level)"
            prefix = f"{source}: {key}: "
        got = err.get("input")
        got_txt = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got: {got!r})"
        lines.append(prefix + _message(err) + got_txt)
    return lines


def _file_params(source: str, raw: Any, errors: list[str]) -> dict[str, ParamDecl]:
    out: dict[str, ParamDecl] = {}
    if not isinstance(raw, dict):
        return out
    for name, default in raw.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            errors.append(f"{source}: params.{name}: a parameter name holds letters, digits and _")
            continue
        t = value_type(default)
        if t is None:
            errors.append(f"{source}: params.{name}: a default must be a number, string or boolean "
                          f"(got: {default!r})")
            continue
        out[name] = ParamDecl(name, t, float(default) if t == NUMBER else default, source)
    return out


def _compile_rule(rule: Rule, where: str, param_types: dict[str, str], errors: list[str]) -> None:
    for key in ("when", "clear_when"):
        text = getattr(rule, key)
        if text is None:
            continue
        try:
            expr = parse_expr(text, param_types, rule.scope, want=BOOL)
        except ExprError as exc:
            errors.append(f"{where}: {key}: {exc}")
            continue
        if key == "when":
            rule._when_expr = expr
        else:
            rule._clear_expr = expr
    _check_param_refs([{f: getattr(a, f, None) for f in _NUM_FIELDS} for a in rule.actions],
                      where, param_types, errors)


_NUM_FIELDS = ("watts", "fraction", "delta_w")


def _check_param_refs(actions: list[Any], where: str, param_types: dict[str, str],
                      errors: list[str]) -> None:
    for i, action in enumerate(actions):
        if not isinstance(action, dict):
            continue
        for fname in _NUM_FIELDS:
            v = action.get(fname)
            m = _PARAM_REF_RE.match(v) if isinstance(v, str) else None
            if m is not None and param_types.get(m.group(1)) != NUMBER:
                what = "is not declared" if m.group(1) not in param_types else "is not a number"
                errors.append(f"{where}: actions[{i}].{fname}: parameter {m.group(1)!r} {what} "
                              f"in the pack's 'params:' (got: {v!r})")


def _compile_raw(raw: Any, where: str, param_types: dict[str, str], errors: list[str]) -> None:
    if not isinstance(raw, dict) or raw.get("scope") not in ("node", "gpu", "coolant"):
        return
    for key in ("when", "clear_when"):
        text = raw.get(key)
        if isinstance(text, str):
            try:
                parse_expr(text, param_types, raw["scope"], want=BOOL)
            except ExprError as exc:
                errors.append(f"{where}: {key}: {exc}")
    if isinstance(raw.get("actions"), list):
        _check_param_refs(raw["actions"], where, param_types, errors)


def load_rule_data(docs: Iterable[tuple[str, Any]]) -> RuleSet:
    """Build a RuleSet from ``(source, parsed YAML)`` pairs; raises RuleLoadError with all errors."""
    errors: list[str] = []
    rs = RuleSet()
    files: list[tuple[str, dict[str, Any], RuleFile | None]] = []
    for source, data in docs:
        rs.files.append(source)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            errors.append(f"{source}: (top level): expected a mapping with 'rules:' (got: {type(data).__name__})")
            continue
        try:
            rf: RuleFile | None = RuleFile.model_validate(data)
        except ValidationError as exc:
            errors.extend(_validation_errors(exc, source, data))
            rf = None
        # Params are collected even when some rule is broken, so every rule's expression can
        # still be checked and reported in the same run.
        for name, decl in _file_params(source, data.get("params"), errors).items():
            prev = rs.params.get(name)
            if prev is not None and (prev.type != decl.type or prev.default != decl.default):
                errors.append(f"{source}: params.{name}: already declared by {prev.source} with "
                              f"{prev.default!r}; one value per parameter (got: {decl.default!r})")
                continue
            rs.params.setdefault(name, decl)
        files.append((source, data, rf))

    param_types = {n: d.type for n, d in rs.params.items()}
    for source, data, rf in files:
        raw_rules = data.get("rules")
        if rf is not None:
            candidates = list(enumerate(rf.rules))
        else:
            # Validate rule by rule, so expression errors in the valid rules are still reported.
            candidates = []
            if isinstance(raw_rules, list):
                for i, raw in enumerate(raw_rules):
                    try:
                        candidates.append((i, Rule.model_validate(raw)))
                    except ValidationError:
                        # Reported through the whole-file validation; still check its expressions.
                        _compile_raw(raw, f"{source}: {_rule_label(raw_rules, i)}", param_types, errors)
        for i, rule in candidates:
            where = f"{source}: {_rule_label(raw_rules, i)}"
            _compile_rule(rule, where, param_types, errors)
            if rule.name in rs.sources:
                errors.append(f"{where}: name: duplicate rule name (first defined at "
                              f"{rs.sources[rule.name]})")
                continue
            rs.sources[rule.name] = f"{source}: rules[{i}]"
            rs.rules.append(rule)
    if errors:
        raise RuleLoadError(_sorted_errors(errors, rs.files))
    return rs


def _sorted_errors(errors: list[str], files: list[str]) -> list[str]:
    """File order, then rule order (stable), so one rule's errors read together."""
    def key(line: str) -> tuple[int, int]:
        fi = next((i for i, f in enumerate(files) if line.startswith(f + ": ")), len(files))
        m = re.match(r"rules\[(\d+)\]", line[len(files[fi]) + 2:] if fi < len(files) else "")
        return fi, int(m.group(1)) if m else -1
    return sorted(errors, key=key)


def read_yaml(path: Path | str) -> tuple[str, Any]:
    """``(source, data)`` for one file; YAML and I/O errors become RuleLoadError."""
    p = Path(path)
    source = str(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RuleLoadError([f"{source}: cannot read: {exc.strerror or exc}"]) from exc
    return source, _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RuleLoadError([f"{source}: {where}invalid YAML: {problem}"]) from exc


def load_rule_files(paths: Iterable[Path | str]) -> RuleSet:
    """Load and check rule files together (names unique over all, params merged)."""
    docs: list[tuple[str, Any]] = []
    errors: list[str] = []
    for p in paths:
        try:
            docs.append(read_yaml(p))
        except RuleLoadError as exc:
            errors.extend(exc.errors)
    try:
        rs = load_rule_data(docs)
    except RuleLoadError as exc:
        errors.extend(exc.errors)
    if errors:
        raise RuleLoadError(errors)
    return rs


def load_rules_text(text: str, source: str = "<rules>") -> RuleSet:
    """Load one rule file from a string (tests, the API)."""
    return load_rule_data([(source, _parse_yaml(text, source))])


PACKS_DIR = Path(__file__).parent / "packs"


def default_pack_paths() -> list[Path]:
    """The packs that ship (``rules/packs/*.yaml``), sorted by name."""
    return sorted(PACKS_DIR.glob("*.yaml"))
