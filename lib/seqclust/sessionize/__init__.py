"""Per-user sessions: inactivity gap, maximum duration and length, deterministic ids."""
