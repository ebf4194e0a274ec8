"""The ``genepert-scale`` command, batch runs from TOML."""
