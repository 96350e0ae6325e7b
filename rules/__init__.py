"""Rule model, expression compiler, engine and actions (see DESIGN.md section 4).

Never imports ``agentd``: rules take plain values and a clock and do no I/O.
"""
