"""Configuration, errors, the run context, stage names and the table contracts."""
