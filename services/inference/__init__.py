"""The inference service: serves the registry's champion (and a canary candidate) as segmentations."""
