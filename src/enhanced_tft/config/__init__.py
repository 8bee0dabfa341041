"""The typed config tree (schema.py: every key with its default and check, load and dump, --set overrides and the
keys a resume may change), safe YAML (yaml_io.py), override rules (overrides.py) and how a failed validation
reads as one message (errors.py).

May import: errors, tasks. Nothing here touches data, models or files other than the YAML it reads.
"""
