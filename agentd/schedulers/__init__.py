"""Scheduler adapters: processes that carry the nodes' throttle state into a scheduler.

``agentd slurm-sync`` (docs/slurm-sync.md) reads every node's throttle body (the retained MQTT
topic or ``GET /v1/throttle``) and drains / resumes Slurm nodes with a reason it owns; it can
also push Slurm's job priorities back to the nodes (``PUT /v1/jobs/{job_id}``). The modules:

* ``config``: the settings file (pydantic), every error located;
* ``throttle``: the throttle body as slurm-sync reads it (untrusted input, validated);
* ``slurm_sync``: the pure decision (bodies + Slurm's node states -> updates), rate limit;
* ``scontrol``: the Slurm commands (``sinfo --json``, ``scontrol update``), with timeouts;
* ``sources``: where bodies come from (MQTT subscription, or polling node APIs);
* ``priorities``: ``squeue --json`` -> class and priority per job -> the nodes' API;
* ``service``: the loop that wires them; ``slurm_cli``: the ``agentd slurm-sync`` command.
"""
