"""Where mail goes: one module per delivery kind, picked by ``[delivery.NAME]
kind`` through :data:`SINKS` (mail_room's ``delivery/`` registry is the
example: a new sink is a new file and one line here)."""
