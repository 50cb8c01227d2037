"""Model families (single-device code) and the registry that maps Hugging Face configs to them."""
