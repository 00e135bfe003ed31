"""labq's common library: settings, lifecycle, messages, bundles, storage, broker, database.

Imported by every service; imports none of them.
"""
