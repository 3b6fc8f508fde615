"""The error of the HF mappings (models/hf_mapping.py, models/hf_moe_mapping.py)."""


class HFMappingError(ValueError):
    """An HF model/config we cannot map; the message is one line meant for the user."""
