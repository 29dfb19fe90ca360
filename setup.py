"""The one compiled part: the proxy's relay after login (argon/proxy/_relay.c, ADR 0011).

Optional: without a C compiler the build skips it and the proxy relays in Python.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):  # epoll and eventfd
    ext_modules.append(Extension("argon.proxy._relay", ["src/argon/proxy/_relay.c"], optional=True,
                                 extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]))

setup(ext_modules=ext_modules)
