"""Everything that crosses a process boundary: the wire types, one module per channel
(``inference``, ``control``, ``jobs``, ``decode``, ``finetune``, ``http``, ``weights``,
``arena``), their
typed decoding (``codec``) and CURVE keys for tcp:// endpoints (``curve``).

Imports nothing of harli but itself, so every process role (and a client in another program)
can import it alone.
"""
