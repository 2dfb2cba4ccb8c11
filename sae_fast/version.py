"""The version of sae_fast (pyproject.toml reads it from here)."""

VERSION = "0.1.0"
