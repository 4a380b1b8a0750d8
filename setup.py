"""Build the optional native ZFile decoder; the project metadata lives in pyproject.toml.

The extension links the system liblz4 and libzstd (Debian: liblz4-dev, libzstd-dev). It is
optional: without a compiler or those headers the build goes on without it and the ZFile
reader uses its pure-Python loop (`workbench.formats.zfile` logs which one is active).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "workbench.formats._zfile_native",
            sources=["workbench/formats/_zfile_native.c"],
            libraries=["lz4", "zstd"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
