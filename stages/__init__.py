"""The stage catalog: one method per file. Importing this package registers every kind.

A new method is a new file plus one line here.
"""
