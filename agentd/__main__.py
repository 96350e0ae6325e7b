"""``python -m agentd`` is the ``agentd`` command (with the same import-clash guard)."""

from agentd.integrity import main

main()
