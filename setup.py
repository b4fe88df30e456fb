"""Builds the optional CPU Gram kernel (``csrc/gram_cpu.cc``).

Everything else is configured in ``pyproject.toml``. The kernel is an XLA
FFI custom call compiled against the FFI headers shipped with jaxlib. It is
optional: if there is no C++ compiler or the build fails, installation goes
on and :func:`gradcraft_jax.gram_matrix` uses its pure-XLA path. Set
``GRADCRAFT_JAX_BUILD_KERNEL=0`` to skip the build.
"""

import os

from setuptools import Extension, setup


def _extensions():
  if os.environ.get("GRADCRAFT_JAX_BUILD_KERNEL", "1") == "0":
    return []
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    return []
  return [
    Extension(
      "gradcraft_jax._gram_cpu",
      sources=["csrc/gram_cpu.cc"],
      include_dirs=[include],
      language="c++",
      extra_compile_args=["-O3", "-std=c++17", "-Wno-psabi", "-fno-math-errno"],
      optional=True,
    )
  ]


setup(ext_modules=_extensions())
