"""The train config: its typed schema (schema.py, registered in Hydra's ConfigStore on import) and
its pure validation (validate.py)."""
