"""Backends: thin framework layers over the dar_core specification. They never import each other."""
