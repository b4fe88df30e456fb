"""The public API is frozen: names and signatures are compared with
``tests/public_api.txt``, so that any change to them is deliberate.

After a deliberate change, regenerate the file with
``python tests/test_public_api.py --update`` and record the change in
``CHANGELOG.md``.
"""

import difflib
import importlib
import inspect
import pathlib
import re
import sys

FROZEN = pathlib.Path(__file__).with_name("public_api.txt")
MODULES = (
  "gradcraft_jax",
  "gradcraft_jax.methods",
  "gradcraft_jax.diagnostics",
  "gradcraft_jax.stages",
  "gradcraft_jax.wrappers",
  "gradcraft_jax.weighting",
  "gradcraft_jax.datasets",
)


def _describe(obj) -> str:
  if inspect.ismodule(obj):
    return "module"
  if inspect.isclass(obj):
    fields = getattr(obj, "_fields", None)
    if fields is not None and issubclass(obj, tuple) and "_field_defaults" in vars(obj):
      return f"NamedTuple{tuple(fields)}"
    try:
      return f"class{inspect.signature(obj)}"
    except (TypeError, ValueError):
      return "class"
  if callable(obj):
    return f"def{inspect.signature(obj)}"
  return f"value: {type(obj).__name__}"


def public_api() -> list[str]:
  lines = []
  for name in MODULES:
    module = importlib.import_module(name)
    for attr in sorted(module.__all__):
      text = f"{name}.{attr}: {_describe(getattr(module, attr))}"
      lines.append(re.sub(r" at 0x[0-9a-f]+", "", text))
  return lines


def test_public_api_is_frozen():
  assert FROZEN.exists(), "run python tests/test_public_api.py --update"
  frozen = FROZEN.read_text().splitlines()
  now = public_api()
  diff = "\n".join(difflib.unified_diff(frozen, now, "public_api.txt", "now", lineterm=""))
  assert now == frozen, (
    "the public API changed; if deliberate, regenerate tests/public_api.txt with "
    "`python tests/test_public_api.py --update` and record it in CHANGELOG.md:\n" + diff
  )


def test_every_public_name_is_documented():
  """Every public function and class has a docstring."""
  missing = []
  for name in MODULES:
    module = importlib.import_module(name)
    for attr in module.__all__:
      obj = getattr(module, attr)
      if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
        missing.append(f"{name}.{attr}")
  assert not missing, missing


if __name__ == "__main__" and "--update" in sys.argv:
  FROZEN.write_text("\n".join(public_api()) + "\n")
  print(f"wrote {FROZEN}")
