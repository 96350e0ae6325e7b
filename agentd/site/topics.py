"""The MQTT topics of the node and of site power capping (DESIGN.md section 6), in one place.

Every topic sits under ``agentd/v1/{site}``. A name that becomes a topic level (site, node,
domain, controller id) must not hold ``/``, ``+``, ``#`` or NUL: ``check_level`` refuses it with
the name and what is wrong, so a node called ``a/b`` cannot publish into another node's tree.
"""

from __future__ import annotations

PREFIX = "agentd/v1"
_FORBIDDEN = ("/", "+", "#", "\x00")


def check_level(value: str, what: str) -> str:
    """``value`` if it can be one topic level, else ValueError naming ``what``."""
    if not value:
        raise ValueError(f"{what} is empty: it becomes an MQTT topic level")
    bad = [c for c in _FORBIDDEN if c in value]
    if bad:
        raise ValueError(f"{what} {value!r} holds {', '.join(repr(c) for c in bad)}, "
                         "which an MQTT topic level cannot")
    return value


def node_power(site: str, node: str) -> str:
    """Where a node publishes its power report (node -> controllers; QoS 0, not retained)."""
    return f"{PREFIX}/{site}/nodes/{node}/power"


def node_power_filter(site: str) -> str:
    """Every node's power report."""
    return f"{PREFIX}/{site}/nodes/+/power"


def node_budget(site: str, node: str, controller: str) -> str:
    """A controller's lease for one node (retained; one topic per controller replica)."""
    return f"{PREFIX}/{site}/nodes/{node}/budget/{controller}"


def node_budget_filter(site: str, node: str) -> str:
    """Every controller's lease for ``node``: the node enforces the minimum of the live ones."""
    return f"{PREFIX}/{site}/nodes/{node}/budget/+"


def node_throttle(site: str, node: str) -> str:
    """The node's throttle body, as GET /v1/throttle serves it (node -> schedulers; QoS 1, retained)."""
    return f"{PREFIX}/{site}/nodes/{node}/throttle"


def node_throttle_filter(site: str) -> str:
    """Every node's throttle body (what slurm-sync subscribes to)."""
    return f"{PREFIX}/{site}/nodes/+/throttle"


def events(site: str) -> str:
    """Rule transitions of every node of the site (QoS 1, not retained)."""
    return f"{PREFIX}/{site}/events"


def domain_power(site: str, domain: str) -> str:
    """Where a subtree controller reports its subtree's aggregate upward, as a node would."""
    return f"{PREFIX}/{site}/domains/{domain}/power"


def domain_budget(site: str, domain: str, controller: str) -> str:
    """A parent controller's lease for a subtree (retained; one topic per controller)."""
    return f"{PREFIX}/{site}/domains/{domain}/budget/{controller}"


def domain_budget_filter(site: str, domain: str) -> str:
    return f"{PREFIX}/{site}/domains/{domain}/budget/+"


def last_level(topic: str) -> str:
    """The last level of a topic (the controller id of a budget topic, the node of ...)."""
    return topic.rsplit("/", 1)[-1]


def node_of(topic: str) -> str | None:
    """The node of a ``.../nodes/{node}/...`` topic, or None when it is not one."""
    parts = topic.split("/")
    try:
        i = parts.index("nodes", 3)
    except ValueError:
        return None
    return parts[i + 1] if i + 1 < len(parts) else None
