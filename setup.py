"""Builds the optional CPU Gram kernel (``csrc/gram_cpu.cc``).

Everything else is configured in ``pyproject.toml``. The kernel is an XLA
FFI custom call compiled against the FFI headers shipped with jaxlib
(``jax.ffi.include_dir()``); the jaxlib version of those headers is compiled
into the library, and :func:`gradcraft_jax.kernel_info` refuses the library
under another jaxlib version (reinstall gradcraft-jax then). It is optional:
if there is no C++ compiler or the build fails, installation goes on and
:func:`gradcraft_jax.gram_matrix` uses its pure-XLA path. Set
``GRADCRAFT_JAX_BUILD_KERNEL=0`` to skip the build.

The kernels rely on IEEE NaN/Inf semantics: ``csrc/gram_cpu.cc`` refuses to
compile with ``-ffast-math`` or ``-ffinite-math-only`` (for example from
``CFLAGS``), and the build is then skipped like any failed build.
"""

import os

from setuptools import Extension, setup


def _jaxlib():
  """``(include dir, version)`` of the jaxlib the kernel is compiled
  against, or None when there is none."""
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  try:
    import jax.ffi  # pylint: disable=import-outside-toplevel

    include = jax.ffi.include_dir()
  except (ImportError, AttributeError):
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  return include, jaxlib.__version__


def _extensions():
  if os.environ.get("GRADCRAFT_JAX_BUILD_KERNEL", "1") == "0":
    return []
  found = _jaxlib()
  if found is None:
    return []
  include, version = found
  if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    return []
  return [
    Extension(
      "gradcraft_jax._gram_cpu",
      sources=["csrc/gram_cpu.cc"],
      include_dirs=[include],
      define_macros=[("GRADCRAFT_JAX_JAXLIB_VERSION", f'"{version}"')],
      language="c++",
      extra_compile_args=["-O3", "-std=c++17", "-Wno-psabi", "-fno-math-errno"],
      optional=True,
    )
  ]


setup(ext_modules=_extensions())
