"""The configuration: typed models, the YAML loader with line numbers, value types."""
