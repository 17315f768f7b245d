"""voxelflow's common library: every service imports it, no service imports another service."""
