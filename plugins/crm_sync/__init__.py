"""crm-sync: one trustworthy customer master in PostgreSQL, fed by scattered source systems."""
