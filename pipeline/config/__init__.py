"""The run's configuration: typed sections and their rules (schema), one value from YAML or the
command line (values), shipped configs by name (shipped), and the run directory a config names
(naming)."""
