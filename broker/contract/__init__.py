"""The wire contract: topics, messages, errors and limits. The only code the hub and a node
must agree on; it imports nothing from ``link`` or ``server``."""
