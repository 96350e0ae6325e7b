"""The node's throttle API (DESIGN.md section 7): what schedulers and operators read and steer.

Modules, one job each: ``config`` (the ``[api]`` section), ``models`` (the pydantic bodies, the
contract), ``snapshot`` (pure: a tick's values -> the immutable snapshot every read is served
from), ``rule_facts`` (a rule's actions, advice and threshold text, once per rule set), ``events``
(rule transitions stamped with wall time), ``leases`` (cap leases with a TTL, persisted in the
state directory), ``auth`` (the bearer token), ``server`` (aiohttp routes, errors, listeners),
``publish`` (the retained MQTT throttle topic and the events topic), ``runtime`` (the daemon's
side: gathers a tick's values, swaps the snapshot), ``openapi`` (the committed document,
generated from the models and the route table), ``metrics`` (GET /metrics, Prometheus).

This package's ``__init__`` imports nothing: ``agentd.config`` reads ``agentd.api.config`` and
must not pull aiohttp in with it.
"""
