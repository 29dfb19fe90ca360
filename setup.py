"""The compiled parts: the proxy's relay after login (argon/proxy/_relay.c, ADR 0012) and the
transaction pooler's engine (argon/proxy/_pooler.c, ADR 0017).

Optional: without a C compiler the build skips them and the proxy relays and pools in Python.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):  # epoll and eventfd
    for name in ("_relay", "_pooler"):
        ext_modules.append(Extension(f"argon.proxy.{name}", [f"src/argon/proxy/{name}.c"], optional=True,
                                     extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]))

setup(ext_modules=ext_modules)
