"""meshtron: an LLM toolkit on PyTorch's own distributed stack (DeviceMesh, DTensor, FSDP2, DCP)."""

__version__ = "0.1.0"
