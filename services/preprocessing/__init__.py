"""The preprocessing service: candidate cases, versioned datasets (sites, splits, QC) and cached preprocessing."""
