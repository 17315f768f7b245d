"""The ingest service: the PACS-facing door of voxelflow (DICOMweb, C-STORE, pulling from a PACS)."""
