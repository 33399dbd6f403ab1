"""Package layout glue: the product card fixes the top-level folders `plugins/` and `rules/`.

They install as the import packages ``filterd_plugins`` (built-in plugins) and ``filterd_rules``
(shipped rule files), so a reader finds each concern by its folder name in the source tree while
the installed package does not claim generic top-level names like ``plugins``.
"""
from setuptools import find_packages, setup

core = find_packages(include=["filterd", "filterd.*"])
builtin = ["filterd_plugins"] + [
    "filterd_plugins." + p for p in find_packages(where="plugins")
]
package_dir = {"filterd_plugins": "plugins", "filterd_rules": "rules"}

setup(packages=core + builtin + ["filterd_rules"], package_dir=package_dir)
