"""Hooks that put the resume gate in front of other libraries' loaders, and seal each checkpoint they save."""
