"""Model store: the catalog of known models, offline pulls, conversion and tiny test models."""
