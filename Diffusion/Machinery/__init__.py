"""The machinery of a run: its config, checkpoints and training state, data, several processes,
the speed options, logging, export and metrics, and the import of the official weights."""
