"""filterd's built-in plugins: one module (or small package) per concern.

Installed as the import package ``filterd_plugins``. Each is a plugin like any third-party one:
hook implementations marked with :data:`filterd.hookspecs.hookimpl`, an optional ``Plugin`` class
for per-pipeline state, and a ``CONFIG`` string with its annotated default settings.
"""
