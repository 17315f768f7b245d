"""PACS ingest service: series grouping, volume reconstruction, conversion."""
