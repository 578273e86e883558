"""Builds the compiled kernel (redisguard/fast/_speedups.c); everything else is in pyproject.toml.

The extension is optional, as aiohttp's and yarl's are: if it cannot be compiled (no compiler, no
Python headers) the install goes on with the pure-Python twin and says so; REDISGUARD_NO_EXTENSIONS=1
skips it. `redisguard --version` tells which one is in use."""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

NO_EXTENSIONS = os.environ.get("REDISGUARD_NO_EXTENSIONS", "") not in ("", "0")


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except PlatformError as e:
            self._warn(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, ValueError) as e:
            self._warn(e)

    @staticmethod
    def _warn(error: Exception) -> None:
        print(
            "*" * 75 + "\nWARNING: redisguard's compiled kernel could not be built (%s).\n"
            "Installing the pure-Python kernel: correct, but slower; `redisguard --version` says\n"
            "'fast path: pure Python'. Install gcc and the Python headers (python3-dev) and reinstall.\n" % error
            + "*" * 75,
            file=sys.stderr,
        )


extensions = [] if NO_EXTENSIONS else [
    Extension("redisguard.fast._speedups", ["redisguard/fast/_speedups.c"], extra_compile_args=["-O2"]),
]
setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
