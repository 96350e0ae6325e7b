"""Site power caps (DESIGN.md section 5): the budget controller process, the node's lease
tracking and power reports, the wire protocol between them, and the site simulation.

The allocation itself is pure and lives in ``rules.budget``; the power-domain tree in
``rules.domains``.
"""
