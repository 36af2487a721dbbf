"""The run's configuration: typed sections, their rules and how a value is read (schema),
shipped configs by name (shipped), the run directory a config names (naming)."""
