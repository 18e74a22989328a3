"""disttrain: YAML-configured distributed training on the collectives and launcher packages."""

__version__ = "0.1.0"
