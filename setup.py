"""Package layout glue: the product card fixes the top-level folders `plugins/` and `rules/`.

They install as the import packages ``filterd_plugins`` (built-in plugins) and ``filterd_rules``
(shipped rule files), so a reader finds each concern by its folder name in the source tree while
the installed package does not claim generic top-level names like ``plugins``.
"""
from setuptools import Extension, find_packages, setup

core = find_packages(include=["filterd", "filterd.*"])
builtin = ["filterd_plugins"] + [
    "filterd_plugins." + p for p in find_packages(where="plugins")
]
package_dir = {"filterd_plugins": "plugins", "filterd_rules": "rules"}

# The Bayes tokenizer's word splitter in C. optional: without a C compiler and the Python headers
# the build goes on and filterd uses the pure-Python splitter (same results, slower).
speedups = Extension("filterd.bayes._speedups", ["filterd/bayes/_speedups.c"], optional=True)

setup(packages=core + builtin + ["filterd_rules"], package_dir=package_dir,
      ext_modules=[speedups])
