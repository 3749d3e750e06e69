"""Where mail comes from: one module per source, picked by the account's
``source`` field through :data:`SOURCES` (mail_room's delivery registry is
the example: a new source is a new file and one line here)."""
