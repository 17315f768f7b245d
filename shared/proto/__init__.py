"""Generated protobuf modules (``make proto``); the sources are ``proto/voxelflow/v1/*.proto``."""
