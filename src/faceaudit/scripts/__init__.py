"""The six stage commands (argument parsing only; each calls one stage function).

The repository-root scripts and the ``[project.scripts]`` entry points both run these
``main(argv=None) -> int`` functions.
"""
