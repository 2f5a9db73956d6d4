"""What runs inside a step's process. Only `store` and `context` are light enough for the CLI."""
