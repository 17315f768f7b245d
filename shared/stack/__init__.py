"""The local stack (``python -m shared.stack up|down|status|env``): voxelflow's real dependencies on one
machine, for development and for the test suite, which drives :class:`Stack` directly."""

from shared.stack.manager import DEFAULT_BASE_PORT, INFRA, PortOffsets, Stack, StackConfig
from shared.stack.process import Component, StackError

__all__ = ["DEFAULT_BASE_PORT", "INFRA", "Component", "PortOffsets", "Stack", "StackConfig", "StackError"]
