"""The power-domain tree: one YAML file shared by the budget controller and the nodes.

A file (flat, every domain names its parent, so a subtree lookup is direct and a cycle shows)::

    version: 1                      # optional; the only version so far
    site: dc1                       # the site's name (an MQTT topic segment)
    bands: {cap_threshold: 0.98, target: 0.95, uncap_threshold: 0.90}   # optional site default
    domains:
      site:    {cap_w: 2.4e6}                       # the one domain with no parent: the root
      hall-a:  {parent: site, cap_w: 1.3 MW, bands: {target: 0.93}}
      rack-a1: {parent: hall-a, cap_w: 42000, nodes: ["gpu-a1-*", "gpu-x07"]}

``cap_w`` takes a number of watts or a string with a unit (``"42 kW"``, ``"1.3 MW"``). A
domain's bands are resolved key by key: its own, else the file's ``bands``, else 0.98 / 0.95 /
0.90; the resolved bands must satisfy ``0 < uncap_threshold < target < cap_threshold <= 1``.
Only leaves (domains with no children) hold ``nodes``: exact names or shell globs
(``fnmatch``, case-sensitive). A node sits in exactly one leaf.

Loading reports every error at once, each located as ``FILE: domains.rack-a1.cap_w: message
(got: value)`` (the style of ``agentd check-config`` and ``agentd rules check``), and raises
``DomainsError``. What is legal but worth knowing (a child cap above its parent's, which can
never bind; children whose caps sum above the parent's, i.e. oversubscription, the normal case;
a leaf with no nodes) comes back as ``Finding``s of severity ``report`` in ``Domains.reports``
and ``Domains.check()``. Pure: no I/O but reading the file in ``load_domains``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rules.model import RuleLoadError, read_yaml

#: A domain or site name is an MQTT topic segment: no '/', '+', '#', no spaces.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
#: A node name or glob: the characters of a host name plus the glob characters.
_NODE_RE = re.compile(r"^[A-Za-z0-9_.:*?\[\]!-]+$")
_GLOB_CHARS = "*?["
_WATTS_RE = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(W|kW|MW)?\s*$")
_WATTS_UNITS = {None: 1.0, "W": 1.0, "kW": 1e3, "MW": 1e6}
_LEAF_CACHE_MAX = 1 << 17
_MISS: Any = object()


@dataclass(frozen=True, slots=True)
class Bands:
    """A domain's capping bands, as fractions of its cap (Dynamo's three bands).

    Above ``cap_threshold x cap`` the domain starts capping and allocates within
    ``target x cap``; it stops only when its uncapped demand is below ``uncap_threshold x cap``.
    """

    cap_threshold: float = 0.98
    target: float = 0.95
    uncap_threshold: float = 0.90

    def problem(self) -> str | None:
        """Why these bands are unusable, or None."""
        if not 0 < self.uncap_threshold < self.target < self.cap_threshold <= 1:
            return (f"bands must satisfy 0 < uncap_threshold < target < cap_threshold <= 1 "
                    f"(got: uncap_threshold={self.uncap_threshold:g}, target={self.target:g}, "
                    f"cap_threshold={self.cap_threshold:g})")
        return None


DEFAULT_BANDS = Bands()


class Severity(StrEnum):
    ERROR = "error"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing ``check`` found: an error (the file is refused) or a report (legal, worth knowing)."""

    severity: Severity
    location: str  # "domains.rack-a1.cap_w", "bands", "node gpu-z1"
    message: str

    def format(self, source: str) -> str:
        return f"{source}: {self.location}: {self.message}"


class DomainsError(Exception):
    """The domains file is invalid; ``errors`` holds every located message (``FILE: key: message``)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Domain:
    """One node of the tree, resolved (bands filled in, children known)."""

    name: str
    parent: str | None
    cap_w: float
    bands: Bands
    nodes: tuple[str, ...]  # names and globs; leaves only
    children: tuple[str, ...]
    depth: int  # the root is 0
    description: str = ""


# --- the file's shape (pydantic) -------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _watts(v: Any) -> Any:
    """``42000``, ``4.2e4``, ``"42 kW"``, ``"1.3 MW"`` -> watts; positive and finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("expected a number of watts, e.g. 42000 or '42 kW'")
    if isinstance(v, str):
        m = _WATTS_RE.match(v)
        if not m:
            raise ValueError("expected a number of watts, e.g. 42000, '42 kW' or '1.3 MW'")
        v = float(m.group(1)) * _WATTS_UNITS[m.group(2)]
    w = float(v)
    if not math.isfinite(w) or w <= 0:
        raise ValueError("a cap must be a positive, finite number of watts")
    return w


class _BandsModel(_Strict):
    cap_threshold: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    target: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    uncap_threshold: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)

    def over(self, base: Bands) -> Bands:
        return Bands(
            cap_threshold=base.cap_threshold if self.cap_threshold is None else self.cap_threshold,
            target=base.target if self.target is None else self.target,
            uncap_threshold=base.uncap_threshold if self.uncap_threshold is None else self.uncap_threshold)


class _DomainModel(_Strict):
    parent: str | None = None
    cap_w: float
    bands: _BandsModel | None = None
    nodes: list[str] | None = None
    description: str = ""

    @field_validator("cap_w", mode="before")
    @classmethod
    def _cap(cls, v: Any) -> Any:
        return _watts(v)


class _FileModel(_Strict):
    version: Literal[1] = 1
    site: str
    bands: _BandsModel | None = None
    domains: dict[Any, Any] = Field(min_length=1)

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("a site name is letters, digits and _ . : - (an MQTT topic segment)")
        return v


_KNOWN_KEYS = {
    "top": ("version", "site", "bands", "domains"),
    "domain": tuple(_DomainModel.model_fields),
    "bands": tuple(_BandsModel.model_fields),
}


def _loc_text(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _message(err: Mapping[str, Any], known: tuple[str, ...]) -> str:
    typ, msg = err["type"], err["msg"]
    if typ == "extra_forbidden":
        return f"unknown key (check the spelling; known: {', '.join(known)})"
    if typ == "missing":
        return "missing (required)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _pydantic_errors(exc: ValidationError, source: str, prefix: tuple[Any, ...]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        known = _KNOWN_KEYS["bands"] if "bands" in loc[:-1] else (
            _KNOWN_KEYS["domain"] if prefix else _KNOWN_KEYS["top"])
        got = err.get("input")
        got_txt = ("" if isinstance(got, (dict, list)) or err["type"] == "missing"
                   else f" (got: {got!r})")
        lines.append(f"{source}: {_loc_text(loc) or '(top level)'}: {_message(err, known)}{got_txt}")
    return lines


def _fmt_w(w: float) -> str:
    if w >= 1e6:
        return f"{w / 1e6:.3g} MW"
    if w >= 1e3:
        return f"{w / 1e3:.4g} kW"
    return f"{w:.4g} W"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _glob_prefix(pattern: str) -> str:
    cut = min((i for i, c in enumerate(pattern) if c in _GLOB_CHARS), default=len(pattern))
    return pattern[:cut]


# --- the tree --------------------------------------------------------------------------------

class Domains:
    """The validated tree. Immutable; lookups are direct (parent, children, spans precomputed).

    Iterating yields domain names in preorder (a parent before its children, children in file
    order); ``leaves`` is in the same order, so a domain's leaves are a contiguous run of it
    (``leaf_span``), which the allocator relies on.
    """

    __slots__ = ("site", "source", "root", "reports", "_d", "_order", "_leaves", "_leaf_span",
                 "_span", "_exact", "_globs", "_glob_lens", "_leaf_cache", "_exact_under", "_post",
                 "leaf_positions", "leaf_spans", "memo")

    def __init__(self, site: str, source: str, domains: Mapping[str, Domain],
                 reports: Iterable[Finding] = ()) -> None:
        """Use ``load_domains`` / ``Domains.from_data``: this takes an already valid tree."""
        self.site = site
        self.source = source
        roots = [d.name for d in domains.values() if d.parent is None]
        if len(roots) != 1:
            raise ValueError(f"a domain tree has exactly one root (got: {roots})")
        self.root = roots[0]
        self._d: dict[str, Domain] = {}
        order: list[str] = []
        stack = [self.root]
        while stack:
            name = stack.pop()
            if name in self._d:
                raise ValueError(f"domain {name!r} is reached twice from the root: the children form a cycle")
            order.append(name)
            self._d[name] = domains[name]
            stack.extend(reversed(domains[name].children))
        if len(order) != len(domains):
            raise ValueError("every domain must be reachable from the root")
        self._order = tuple(order)
        self.reports = tuple(reports)
        pos = {n: i for i, n in enumerate(order)}
        # _span[d] = (i, j): d's subtree is _order[i:j]
        self._span: dict[str, tuple[int, int]] = {}
        for name in reversed(order):
            kids = self._d[name].children
            end = self._span[kids[-1]][1] if kids else pos[name] + 1
            self._span[name] = (pos[name], end)
        self._leaves = tuple(n for n in order if not self._d[n].children)
        lpos = {n: i for i, n in enumerate(self._leaves)}
        #: leaf name -> its index in ``leaves``
        self.leaf_positions: Mapping[str, int] = lpos
        self._leaf_span: dict[str, tuple[int, int]] = {}
        for name in reversed(order):
            kids = self._d[name].children
            if not kids:
                self._leaf_span[name] = (lpos[name], lpos[name] + 1)
            else:
                self._leaf_span[name] = (self._leaf_span[kids[0]][0], self._leaf_span[kids[-1]][1])
        #: domain name -> ``(i, j)``: its leaves are ``leaves[i:j]``
        self.leaf_spans: Mapping[str, tuple[int, int]] = self._leaf_span
        # node index: exact names -> leaves; globs grouped by their literal prefix
        self._exact: dict[str, list[str]] = {}
        self._globs: dict[tuple[int, str], list[tuple[str, str]]] = {}
        for leaf in self._leaves:
            for pat in self._d[leaf].nodes:
                if _is_glob(pat):
                    pre = _glob_prefix(pat)
                    self._globs.setdefault((len(pre), pre), []).append((pat, leaf))
                else:
                    self._exact.setdefault(pat, []).append(leaf)
        self._glob_lens = tuple(sorted({k[0] for k in self._globs}))
        self._leaf_cache: dict[str, str | None | DomainsError] = {}
        self._exact_under: dict[str, tuple[str, ...]] = {}
        self._post: dict[str, tuple[Domain, ...]] = {}
        #: scratch for callers that derive per-cycle structures from the tree (the allocator
        #: keeps where last cycle's nodes went); never part of the tree's meaning
        self.memo: dict[Any, Any] = {}

    # construction
    @classmethod
    def from_data(cls, data: Any, source: str = "<domains>") -> Domains:
        """Validate a parsed file (a dict); raise ``DomainsError`` with every error."""
        return _build(data, source)

    # the tree
    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._d

    def __getitem__(self, name: str) -> Domain:
        try:
            return self._d[name]
        except KeyError:
            raise KeyError(f"unknown domain {name!r} in {self.source}") from None

    def parent(self, name: str) -> str | None:
        return self[name].parent

    def children(self, name: str) -> tuple[str, ...]:
        return self[name].children

    def is_leaf(self, name: str) -> bool:
        return not self[name].children

    def cap_w(self, name: str) -> float:
        return self[name].cap_w

    def bands(self, name: str) -> Bands:
        return self[name].bands

    def path_to_root(self, name: str) -> tuple[str, ...]:
        """``(name, its parent, ..., root)``."""
        out = [name]
        p = self[name].parent
        while p is not None:
            out.append(p)
            p = self._d[p].parent
        return tuple(out)

    def subtree(self, name: str) -> tuple[str, ...]:
        """``name`` and every domain below it, in preorder."""
        i, j = self._span[self[name].name]
        return self._order[i:j]

    @property
    def leaves(self) -> tuple[str, ...]:
        return self._leaves

    def leaf_span(self, name: str) -> tuple[int, int]:
        """``(i, j)``: the leaves under ``name`` are ``leaves[i:j]``."""
        return self._leaf_span[self[name].name]

    @property
    def depth(self) -> int:
        """Levels in the tree (a lone root: 1)."""
        return 1 + max(d.depth for d in self._d.values())

    # nodes
    def leaf_matches(self, node: str) -> tuple[str, ...]:
        """Every leaf whose names or globs match ``node`` (normally one; none: not in the tree)."""
        found = list(self._exact.get(node, ()))
        for n in self._glob_lens:
            for pat, leaf in self._globs.get((n, node[:n]), ()):
                if fnmatchcase(node, pat) and leaf not in found:
                    found.append(leaf)
        if len(found) > 1:
            found.sort(key=self.leaf_positions.__getitem__)
        return tuple(found)

    def leaf_of(self, node: str) -> str | None:
        """The leaf holding ``node``, or None when no leaf names it.

        Raises ``DomainsError`` when it matches two leaves (two globs that overlap: a file
        cannot say where such a node's power goes, so it is refused rather than guessed).
        """
        got = self._leaf_cache.get(node, _MISS)
        if got is _MISS:
            got = self._resolve(node)
        if isinstance(got, DomainsError):
            raise DomainsError(got.errors)
        return got

    def lookup_leaves(self, nodes: Sequence[str]) -> list[str | None | DomainsError]:
        """``leaf_of`` for many nodes at once (the allocator's intake): a node in two leaves
        comes back as the ``DomainsError`` that ``leaf_of`` would raise, not raised."""
        cache = self._leaf_cache
        out = [cache.get(n, _MISS) for n in nodes]
        for k, got in enumerate(out):
            if got is _MISS:
                out[k] = self._resolve(nodes[k])
        return out

    def _resolve(self, node: str) -> str | None | DomainsError:
        found = self.leaf_matches(node)
        got: str | None | DomainsError
        if len(found) > 1:
            got = DomainsError([f"{self.source}: node {node!r} matches {len(found)} leaves "
                                f"({', '.join(self._why(node, leaf) for leaf in found)}): "
                                "a node must match exactly one leaf; narrow the globs"])
        else:
            got = found[0] if found else None
        if len(self._leaf_cache) >= _LEAF_CACHE_MAX:
            self._leaf_cache.clear()  # names from untrusted reports must not grow it without bound
        self._leaf_cache[node] = got
        return got

    def postorder(self, name: str | None = None) -> tuple[Domain, ...]:
        """The subtree of ``name`` (default: the root), children before their parent."""
        name = self.root if name is None else name
        got = self._post.get(name)
        if got is None:
            got = self._post[name] = tuple(self._d[n] for n in reversed(self.subtree(name)))
        return got

    def _why(self, node: str, leaf: str) -> str:
        pats = [p for p in self._d[leaf].nodes if p == node or (_is_glob(p) and fnmatchcase(node, p))]
        return f"{leaf} ({', '.join(pats)})"

    def nodes_in(self, name: str, nodes: Iterable[str]) -> list[str]:
        """The concrete ``nodes`` that sit in ``name``'s subtree (ambiguous ones left out)."""
        i, j = self.leaf_span(name)
        under = set(self._leaves[i:j])
        out = []
        for n in nodes:
            found = self.leaf_matches(n)
            if len(found) == 1 and found[0] in under:
                out.append(n)
        return out

    def exact_nodes(self, name: str | None = None) -> tuple[str, ...]:
        """The node names (not globs) the file lists under ``name`` (default: the root)."""
        name = self.root if name is None else name
        got = self._exact_under.get(name)
        if got is None:
            i, j = self.leaf_span(name)
            got = tuple(p for leaf in self._leaves[i:j] for p in self._d[leaf].nodes if not _is_glob(p))
            self._exact_under[name] = got
        return got

    def check(self, nodes: Iterable[str] | None = None) -> list[Finding]:
        """What loading reported, plus, for a concrete node list: nodes matching two leaves
        (errors), nodes in no leaf and leaf entries matching none of the nodes (reports)."""
        out = list(self.reports)
        if nodes is None:
            return out
        names = list(dict.fromkeys(nodes))
        used: set[tuple[str, str]] = set()
        for node in names:
            found = self.leaf_matches(node)
            if not found:
                out.append(Finding(Severity.REPORT, f"node {node}",
                                   "in no leaf of the tree: it gets no site budget and its power is not counted"))
            elif len(found) > 1:
                out.append(Finding(Severity.ERROR, f"node {node}",
                                   f"matches {len(found)} leaves ({', '.join(self._why(node, f) for f in found)}): "
                                   "a node must match exactly one leaf; narrow the globs"))
            for leaf in found:
                for p in self._d[leaf].nodes:
                    if p == node or (_is_glob(p) and fnmatchcase(node, p)):
                        used.add((leaf, p))
        for leaf in self._leaves:
            for k, p in enumerate(self._d[leaf].nodes):
                if (leaf, p) not in used:
                    out.append(Finding(Severity.REPORT, f"domains.{leaf}.nodes[{k}]",
                                       f"{p!r} matches none of the {len(names)} given nodes"))
        return out

    def summary(self, nodes: Iterable[str] | None = None, max_lines: int = 60) -> list[str]:
        """A short indented tree: caps, bands that differ from the defaults, node counts."""
        node_list = None if nodes is None else list(dict.fromkeys(nodes))
        counts: dict[str, int] = {}
        if node_list is not None:
            for n in node_list:
                found = self.leaf_matches(n)
                if len(found) == 1:
                    counts[found[0]] = counts.get(found[0], 0) + 1
        lines = [f"site {self.site}: {len(self)} domains, {len(self._leaves)} leaves, {self.depth} levels, "
                 f"root {self.root} cap {_fmt_w(self._d[self.root].cap_w)}"]
        # the deepest level that still fits in max_lines
        by_depth: dict[int, int] = {}
        for d in self._d.values():
            by_depth[d.depth] = by_depth.get(d.depth, 0) + 1
        show_depth, total = -1, 0
        for depth in sorted(by_depth):
            if total + by_depth[depth] > max_lines and show_depth >= 0:
                break
            total += by_depth[depth]
            show_depth = depth
        for name in self._order:
            d = self._d[name]
            if d.depth > show_depth:
                continue
            text = f"{'  ' * d.depth}{name}  cap {_fmt_w(d.cap_w)}"
            if d.bands != DEFAULT_BANDS:
                b = d.bands
                text += f"  bands {b.cap_threshold:g}/{b.target:g}/{b.uncap_threshold:g}"
            if d.children:
                kids = sum(self._d[c].cap_w for c in d.children)
                text += f"  children {len(d.children)} sum {_fmt_w(kids)} ({kids / d.cap_w:.2f}x)"
                if d.depth == show_depth:
                    text += f"  (+{self._span[name][1] - self._span[name][0] - 1} below)"
            else:
                text += f"  nodes {len(d.nodes)} entries"
                if node_list is not None:
                    text += f", {counts.get(name, 0)} matched"
            lines.append(text)
        return lines


# --- loading ---------------------------------------------------------------------------------

def load_domains(path: Path | str) -> Domains:
    """Read and validate a domains file; ``DomainsError`` lists every error, located."""
    try:
        source, data = read_yaml(path)
    except RuleLoadError as exc:
        raise DomainsError(exc.errors) from exc
    return _build(data, source)


def load_domains_text(text: str, source: str = "<domains>") -> Domains:
    """Validate a domains file given as a string (tests, the API)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise DomainsError([f"{source}: {where}invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from exc
    return _build(data, source)


def _build(data: Any, source: str) -> Domains:
    errors: list[str] = []
    reports: list[Finding] = []

    def err(loc: str, msg: str) -> None:
        errors.append(f"{source}: {loc}: {msg}")

    def report(loc: str, msg: str) -> None:
        reports.append(Finding(Severity.REPORT, loc, msg))

    if not isinstance(data, dict):
        raise DomainsError([f"{source}: (top level): expected a mapping with 'site:' and 'domains:' "
                            f"(got: {type(data).__name__})"])
    try:
        top = _FileModel.model_validate(data)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(exc, source, ()))
        raw = data.get("domains")
        if not isinstance(raw, dict) or not raw:
            raise DomainsError(errors) from exc
        top = None
    site = top.site if top is not None else str(data.get("site", ""))
    raw_domains: dict[Any, Any] = top.domains if top is not None else data["domains"]
    file_bands = DEFAULT_BANDS
    if top is not None and top.bands is not None:
        file_bands = top.bands.over(DEFAULT_BANDS)
        if (p := file_bands.problem()) is not None:
            err("bands", p)

    models: dict[str, _DomainModel] = {}
    names: list[str] = []
    for name, body in raw_domains.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            err(f"domains.{name}", "a domain name is letters, digits and _ . : - (an MQTT topic segment)")
            continue
        names.append(name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            err(f"domains.{name}", f"expected a mapping with cap_w (got: {body!r})")
            continue
        try:
            models[name] = _DomainModel.model_validate(body)
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, source, ("domains", name)))
    known = set(names)

    # parents
    parent: dict[str, str | None] = {}
    for name, m in models.items():
        p = m.parent
        if p is not None and p not in known:
            close = difflib.get_close_matches(p, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(names[:10])})"
            err(f"domains.{name}.parent", f"unknown domain {p!r}{hint}")
            continue
        if p == name:
            err(f"domains.{name}.parent", "a domain cannot be its own parent")
            continue
        parent[name] = p
    # cycles: follow each parent chain; report each cycle once, at its first member in file order
    seen_cycle: set[str] = set()
    for name in names:
        chain: list[str] = []
        cur: str | None = name
        on_chain: set[str] = set()
        while cur is not None and cur in parent and cur not in on_chain and cur not in seen_cycle:
            on_chain.add(cur)
            chain.append(cur)
            cur = parent[cur]
        if cur is not None and cur in on_chain:
            cyc = chain[chain.index(cur):]
            seen_cycle.update(cyc)
            first = min(cyc, key=names.index)
            k = cyc.index(first)
            loop = cyc[k:] + cyc[:k] + [first]
            err(f"domains.{first}.parent", f"cycle {' -> '.join(loop)}: every parent chain must end at the root")
    # counted from the raw bodies, so a domain refused above still counts as the root it claims to be
    roots = [n for n in names if not isinstance(raw_domains[n], dict) or raw_domains[n].get("parent") is None]
    if len(roots) > 1:
        err("domains", f"{len(roots)} root domains ({', '.join(roots)}): exactly one domain has no parent; "
                       "give the others a parent")
    elif not roots and not seen_cycle:
        err("domains", "no root domain: exactly one domain has no parent (the site)")

    children: dict[str, list[str]] = {n: [] for n in names}
    for name in names:
        p = parent.get(name)
        if p is not None and p in children:
            children[p].append(name)

    # bands, nodes
    owner: dict[str, tuple[str, int]] = {}
    for name, m in models.items():
        if m.bands is not None:
            b = m.bands.over(file_bands)
            if (prob := b.problem()) is not None:
                err(f"domains.{name}.bands", prob + " (resolved over the file's bands and the defaults)")
        if m.nodes is None:
            if not children[name]:
                report(f"domains.{name}", "a leaf with no nodes: its cap holds nothing")
            continue
        if children[name]:
            err(f"domains.{name}.nodes", f"only a leaf holds nodes ({name} has children: "
                                          f"{', '.join(children[name][:5])}); move them to a leaf")
            continue
        local: set[str] = set()
        for k, pat in enumerate(m.nodes):
            if not _NODE_RE.match(pat):
                err(f"domains.{name}.nodes[{k}]", "a node name or glob is letters, digits, _ . : - and * ? [ ] ! "
                                                   f"(got: {pat!r})")
                continue
            if pat in local:
                report(f"domains.{name}.nodes[{k}]", f"{pat!r} is listed twice in {name}")
                continue
            local.add(pat)
            if pat in owner:
                other, ok = owner[pat]
                err(f"domains.{name}.nodes[{k}]", f"{pat!r} is also in {other} (nodes[{ok}]): "
                                                   "a node sits in exactly one leaf")
                continue
            owner[pat] = (name, k)
    # an exact name that another leaf's glob also matches is in two leaves
    globs = [(pat, leaf) for pat, (leaf, _) in owner.items() if _is_glob(pat)]
    if globs:
        by_prefix: dict[tuple[int, str], list[tuple[str, str]]] = {}
        for pat, leaf in globs:
            pre = _glob_prefix(pat)
            by_prefix.setdefault((len(pre), pre), []).append((pat, leaf))
        lens = sorted({k[0] for k in by_prefix})
        for pat, (leaf, k) in owner.items():
            if _is_glob(pat):
                continue
            for n in lens:
                for g, gleaf in by_prefix.get((n, pat[:n]), ()):
                    if gleaf != leaf and fnmatchcase(pat, g):
                        err(f"domains.{leaf}.nodes[{k}]", f"{pat!r} also matches {gleaf}'s {g!r}: "
                                                           "a node sits in exactly one leaf")

    if errors:
        raise DomainsError(errors)

    # resolved tree (depths from the root down)
    depth: dict[str, int] = {}
    root = roots[0]
    todo = [(root, 0)]
    while todo:
        at, dep = todo.pop()
        depth[at] = dep
        todo.extend((c, dep + 1) for c in children[at])
    built: dict[str, Domain] = {}
    for name in names:
        m = models[name]
        built[name] = Domain(name=name, parent=m.parent, cap_w=m.cap_w,
                             bands=m.bands.over(file_bands) if m.bands is not None else file_bands,
                             nodes=tuple(dict.fromkeys(m.nodes or ())), children=tuple(children[name]),
                             depth=depth[name], description=m.description)
    for name in names:
        d = built[name]
        if d.parent is not None and d.cap_w > built[d.parent].cap_w:
            report(f"domains.{name}.cap_w", f"{_fmt_w(d.cap_w)} is above its parent {d.parent}'s cap "
                                            f"({_fmt_w(built[d.parent].cap_w)}): it can never bind")
        if d.children:
            kids = sum(built[c].cap_w for c in d.children)
            if kids > d.cap_w:
                report(f"domains.{name}", f"children's caps sum to {_fmt_w(kids)}, {kids / d.cap_w:.2f}x its cap "
                                          f"({_fmt_w(d.cap_w)}): oversubscribed (normal: {name}'s cap binds "
                                          "before its children's do)")
            elif kids < d.cap_w:
                report(f"domains.{name}", f"children's caps sum to {_fmt_w(kids)}, under its cap "
                                          f"({_fmt_w(d.cap_w)}): {name}'s own cap can never bind")
    return Domains(site, source, built, reports)
