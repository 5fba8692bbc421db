"""Raw events in, clean typed events out; bad rows to quarantine with a reason."""
