"""The optional C extension (proxy/_relay.c, the UDP fast path; see
proxy/accel.py).  Everything else is declared in pyproject.toml.  Without a
compiler or Python's headers the build skips it (optional=True) and the
proxy runs its pure-Python path."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("proxy._relay", ["proxy/_relay.c"], optional=True,
              extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                  "-Wno-missing-field-initializers"]),
])
