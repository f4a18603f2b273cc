"""Built-in verifier plugins of dapo-pl, installed as ``dapo_pl_verifiers``.

Each module here is a plugin registered through the ``dapo_pl.verifiers`` entry points in pyproject.toml,
exactly like a third-party package would be.
"""
