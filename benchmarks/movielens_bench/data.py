"""MovieLens-100K: reading, fetching, encoding, the leave-last-out split and
negative sampling.

Two file layouts are read from a directory (or its ``ml-100k/`` subfolder):

* GroupLens (``files.grouplens.org/datasets/movielens/ml-100k.zip``):
  ``u.data`` (tab-separated ``user item rating timestamp``), ``u.user``
  (``id|age|gender|occupation|zip``), ``u.item`` (Latin-1, ``id|title|release
  date|video release date|URL|`` then one 0/1 flag per genre), ``u.genre``
  (genre names; optional: the 19 standard names otherwise);
* RecBole's atomic files (``<name>.inter``, ``<name>.user``,
  ``<name>.item``; a header row of ``field:type`` names, tab-separated, the
  genres of ``class:token_seq`` separated by spaces), as shipped in the
  ``recbole`` package under ``recbole/dataset_example/ml-100k/``.

Both give the same :class:`Raw` interactions and side information. The data
set's licence forbids redistribution: :func:`fetch` downloads it into a local
cache (never into the repository).

:func:`encode` maps ids to dense indices (``0`` is padding / unknown) and the
side information to small vocabularies; :func:`split` holds out the last
interactions of each user by time; :func:`training_rows` adds sampled
unobserved items; :func:`eval_candidates` draws the ranking candidates.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence

import numpy as np

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_SPEC = "recbole==1.2.1"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gradcraft-jax", "ml-100k")
GROUPLENS_FILES = ("u.data", "u.item", "u.user", "u.genre")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")

# The 19 genres of u.genre, in the order of u.item's flags.
GENRES = (
  "unknown",
  "Action",
  "Adventure",
  "Animation",
  "Children's",
  "Comedy",
  "Crime",
  "Documentary",
  "Drama",
  "Fantasy",
  "Film-Noir",
  "Horror",
  "Musical",
  "Mystery",
  "Romance",
  "Sci-Fi",
  "Thriller",
  "War",
  "Western",
)
# Age buckets of MovieLens-1M's users.dat: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
# Release-year buckets: <1960, 1960s, 1970s, 1980s, 1990-94, 1995, 1996, 1997+.
YEAR_EDGES = (1960, 1970, 1980, 1990, 1995, 1996, 1997)
SIDE_NAMES = ("age", "gender", "occupation", "zip_prefix", "release_year")


@dataclasses.dataclass
class Raw:
  """Interactions and side information as read (original ids)."""

  source: str  # "grouplens" or "recbole"
  user: np.ndarray  # (N,) int64
  item: np.ndarray  # (N,) int64
  rating: np.ndarray  # (N,) float32
  timestamp: np.ndarray  # (N,) int64
  users: dict  # user id -> (age: int | None, gender: str, occupation: str, zip: str)
  items: dict  # item id -> (year: int | None, genres: tuple[str, ...])


@dataclasses.dataclass
class MovieLens:
  """Encoded data: users ``1..n_users``, items ``1..n_items`` (0: padding)."""

  source: str
  n_users: int
  n_items: int
  user: np.ndarray  # (N,) int32 interactions
  item: np.ndarray  # (N,) int32
  rating: np.ndarray  # (N,) float32
  timestamp: np.ndarray  # (N,) int64
  user_side: np.ndarray  # (n_users + 1, 4) int32: age, gender, occupation, zip prefix
  item_side: np.ndarray  # (n_items + 1, 1) int32: release-year bucket
  item_genres: np.ndarray  # (n_items + 1, G) int32 genre ids, 0-padded
  side_vocab: tuple  # vocabulary sizes of SIDE_NAMES (index 0: unknown)
  genre_vocab: int  # genre ids 1..genre_vocab - 1
  user_ids: np.ndarray  # (n_users + 1,) original id of each index (index 0: -1)
  item_ids: np.ndarray  # (n_items + 1,)


@dataclasses.dataclass
class Split:
  """Leave-last-out split. ``train``, ``val``, ``test``: the interactions
  (``user``, ``item``, ``rating``, ``pos`` arrays; ``pos``: the number of the
  user's training interactions before this one, i.e. the length of its
  history). ``sequences``: ``(n_users + 1, max_len)`` each user's training
  items in time order, 0-padded."""

  train: dict
  val: dict
  test: dict
  holdout: int
  sequences: np.ndarray


# ----------------------------------------------------------------- reading


def _find(data_dir: str) -> tuple[str, str]:
  """``(layout, directory)`` of the files under ``data_dir``."""
  for d in (data_dir, os.path.join(data_dir, "ml-100k")):
    if os.path.isfile(os.path.join(d, "u.data")):
      return "grouplens", d
    if glob.glob(os.path.join(d, "*.inter")):
      return "recbole", d
  raise FileNotFoundError(
    f"no MovieLens-100K files in {data_dir!r}: expected the GroupLens u.data/u.item/u.user "
    "or RecBole's atomic .inter/.item/.user files (run with --fetch to download them)"
  )


def _int_or_none(s: str) -> int | None:
  s = s.strip()
  return int(s) if s.isdigit() else None


def read_grouplens(d: str) -> Raw:
  """The GroupLens files ``u.data``, ``u.user``, ``u.item`` (``u.genre`` if present)."""
  inter = np.loadtxt(os.path.join(d, "u.data"), dtype=np.int64, ndmin=2)
  if inter.shape[1] != 4:
    raise ValueError(f"u.data: expected 4 columns (user item rating timestamp), got {inter.shape}")
  genres = GENRES
  gpath = os.path.join(d, "u.genre")
  if os.path.isfile(gpath):
    with open(gpath, encoding="latin-1") as f:
      pairs = [ln.strip().split("|") for ln in f if ln.strip()]
    genres = tuple(name for name, _ in sorted(pairs, key=lambda p: int(p[1])))
  users = {}
  with open(os.path.join(d, "u.user"), encoding="latin-1") as f:
    for ln in f:
      if ln.strip():
        uid, age, gender, occ, zipc = ln.rstrip("\n").split("|")[:5]
        users[int(uid)] = (_int_or_none(age), gender, occ, zipc)
  items = {}
  with open(os.path.join(d, "u.item"), encoding="latin-1") as f:
    for ln in f:
      if not ln.strip():
        continue
      parts = ln.rstrip("\n").split("|")
      flags = parts[-len(genres) :]
      if len(parts) < 5 + len(genres):
        raise ValueError(f"u.item: expected 5 + {len(genres)} fields, got {len(parts)}: {ln!r}")
      date = parts[2].strip()
      year = _int_or_none(date[-4:]) if date else None
      items[int(parts[0])] = (year, tuple(g for g, v in zip(genres, flags) if v.strip() == "1"))
  return Raw(
    "grouplens",
    inter[:, 0],
    inter[:, 1],
    inter[:, 2].astype(np.float32),
    inter[:, 3],
    users,
    items,
  )


def _atomic(path: str) -> tuple[list[str], list[list[str]]]:
  """Header field names (``name:type`` -> ``name``) and the rows of an atomic file."""
  with open(path, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
  return [h.split(":")[0] for h in header], rows


def read_recbole(d: str) -> Raw:
  """RecBole's atomic ``.inter``, ``.user``, ``.item`` files of one data set."""
  inters = sorted(glob.glob(os.path.join(d, "*.inter")))
  if len(inters) != 1:
    raise ValueError(f"expected one .inter file in {d!r}, found {inters}")
  stem = inters[0][: -len(".inter")]
  names, rows = _atomic(stem + ".inter")
  col = {n: i for i, n in enumerate(names)}
  missing = {"user_id", "item_id", "rating", "timestamp"} - set(col)
  if missing:
    raise ValueError(f"{stem}.inter lacks the fields {sorted(missing)}")
  arr = np.array(
    [[r[col["user_id"]], r[col["item_id"]], r[col["rating"]], r[col["timestamp"]]] for r in rows],
    dtype=np.float64,
  )
  names, rows = _atomic(stem + ".user")
  c = {n: i for i, n in enumerate(names)}
  users = {
    int(r[c["user_id"]]): (
      _int_or_none(r[c["age"]]),
      r[c["gender"]],
      r[c["occupation"]],
      r[c["zip_code"]],
    )
    for r in rows
  }
  names, rows = _atomic(stem + ".item")
  c = {n: i for i, n in enumerate(names)}
  items = {}
  for r in rows:
    r = r + [""] * (len(names) - len(r))
    year = _int_or_none(r[c["release_year"]]) if "release_year" in c else None
    genres = tuple(r[c["class"]].split()) if "class" in c else ()
    items[int(r[c["item_id"]])] = (year, genres)
  return Raw(
    "recbole",
    arr[:, 0].astype(np.int64),
    arr[:, 1].astype(np.int64),
    arr[:, 2].astype(np.float32),
    arr[:, 3].astype(np.int64),
    users,
    items,
  )


def read(data_dir: str) -> Raw:
  """The interactions and side information in ``data_dir`` (either layout)."""
  layout, d = _find(data_dir)
  return read_grouplens(d) if layout == "grouplens" else read_recbole(d)


# ---------------------------------------------------------------- fetching


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _fetch_grouplens(dest: str, timeout: float) -> str:
  with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as r:
    blob = r.read()
  with zipfile.ZipFile(io.BytesIO(blob)) as z:
    for name in GROUPLENS_FILES:
      with z.open(f"ml-100k/{name}") as src, open(os.path.join(dest, name), "wb") as out:
        shutil.copyfileobj(src, out)
  return f"GroupLens {GROUPLENS_URL} (zip sha256 {hashlib.sha256(blob).hexdigest()})"


def _fetch_recbole(dest: str, timeout: float) -> str:
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", RECBOLE_SPEC, "--no-deps", "-d", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, 4 * timeout))
    wheels = glob.glob(os.path.join(tmp, "recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout)[-500:]}")
    with zipfile.ZipFile(wheels[0]) as z:
      for name in RECBOLE_FILES:
        with z.open(RECBOLE_PREFIX + name) as src, open(os.path.join(dest, name), "wb") as out:
          shutil.copyfileobj(src, out)
    digest = _sha256(wheels[0])
    return (
      f"PyPI {RECBOLE_SPEC} wheel {os.path.basename(wheels[0])} (sha256 {digest}), {RECBOLE_PREFIX}"
    )


def fetch(cache_dir: str = DEFAULT_CACHE, *, timeout: float = 30.0, log=print) -> str:
  """Download MovieLens-100K into ``cache_dir`` unless it is there already.

  Tries GroupLens first; where it cannot be reached, the copy inside the
  RecBole wheel on PyPI (``pip download recbole==1.2.1 --no-deps``). Writes
  ``SOURCE.txt`` (where the files came from, when, their sha256) and returns
  ``cache_dir``. The files are never redistributed: keep the cache outside
  the repository.
  """
  try:
    layout, _ = _find(cache_dir)
    log(f"MovieLens-100K: using the cached {layout} files in {cache_dir}")
    return cache_dir
  except FileNotFoundError:
    pass
  os.makedirs(cache_dir, exist_ok=True)
  errors = []
  for name, fn in (("GroupLens", _fetch_grouplens), ("RecBole on PyPI", _fetch_recbole)):
    try:
      log(f"MovieLens-100K: downloading from {name} ...")
      source = fn(cache_dir, timeout)
      break
    except Exception as e:  # noqa: BLE001 - the next source is tried, every error reported
      errors.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
      log(f"MovieLens-100K: {name} failed ({errors[-1]})")
  else:
    raise RuntimeError("could not download MovieLens-100K:\n  " + "\n  ".join(errors))
  files = sorted(f for f in os.listdir(cache_dir) if f != "SOURCE.txt")
  stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  with open(os.path.join(cache_dir, "SOURCE.txt"), "w") as f:
    f.write(f"source: {source}\nfetched: {stamp}\n")
    for name in files:
      f.write(f"sha256 {name}: {_sha256(os.path.join(cache_dir, name))}\n")
  log(f"MovieLens-100K: saved to {cache_dir} from {source}")
  return cache_dir


def source_note(data_dir: str) -> str:
  """The first line of ``SOURCE.txt`` in ``data_dir``, or the layout found."""
  path = os.path.join(data_dir, "SOURCE.txt")
  if os.path.isfile(path):
    with open(path) as f:
      return f.readline().strip().removeprefix("source: ")
  layout, d = _find(data_dir)
  return f"{layout} files in {d}"


# ---------------------------------------------------------------- encoding


def _bucket(value: int | None, edges: Sequence[int]) -> int:
  """``0`` for unknown, else ``1 + #{edges <= value}``."""
  return 0 if value is None else 1 + int(np.searchsorted(np.asarray(edges), value, side="right"))


def _vocab(values) -> dict:
  """Sorted distinct non-empty values -> ids ``1..`` (0: unknown)."""
  return {v: i + 1 for i, v in enumerate(sorted({v for v in values if v}))}


def _zip_prefix(z: str) -> str:
  z = z.strip()
  return z[0] if z[:1].isdigit() else ("other" if z else "")


def encode(raw: Raw) -> MovieLens:
  """Dense ids and side-feature vocabularies (index 0: padding / unknown).

  User side: age bucket (:data:`AGE_EDGES`), gender, occupation, first digit
  of the zip code (``other`` for non-US codes); item side: release-year
  bucket (:data:`YEAR_EDGES`) and the genres (a multi-valued feature, padded
  with 0). Interactions whose user or item has no side information keep
  index 0 for it (unknown).
  """
  if raw.user.size == 0:
    raise ValueError("no interactions")
  r = raw.rating
  if not np.all(np.isfinite(r)):
    raise ValueError("non-finite ratings")
  uids = np.array(sorted(set(raw.user.tolist()) | set(raw.users)), np.int64)
  iids = np.array(sorted(set(raw.item.tolist()) | set(raw.items)), np.int64)
  u_index = {u: i + 1 for i, u in enumerate(uids.tolist())}
  i_index = {v: i + 1 for i, v in enumerate(iids.tolist())}
  gender = _vocab(v[1] for v in raw.users.values())
  occ = _vocab(v[2] for v in raw.users.values())
  zips = _vocab(_zip_prefix(v[3]) for v in raw.users.values())
  user_side = np.zeros((len(uids) + 1, 4), np.int32)
  for u, (age, g, o, z) in raw.users.items():
    user_side[u_index[u]] = (
      _bucket(age, AGE_EDGES),
      gender.get(g, 0),
      occ.get(o, 0),
      zips.get(_zip_prefix(z), 0),
    )
  names = list(GENRES) + sorted({g for _, gs in raw.items.values() for g in gs} - set(GENRES))
  genre_id = {g: i + 1 for i, g in enumerate(names)}
  width = max([len(gs) for _, gs in raw.items.values()] + [1])
  item_side = np.zeros((len(iids) + 1, 1), np.int32)
  item_genres = np.zeros((len(iids) + 1, width), np.int32)
  for v, (year, gs) in raw.items.items():
    item_side[i_index[v], 0] = _bucket(year, YEAR_EDGES)
    ids = sorted(genre_id[g] for g in set(gs))
    item_genres[i_index[v], : len(ids)] = ids
  side_vocab = (
    len(AGE_EDGES) + 2,
    len(gender) + 1,
    len(occ) + 1,
    len(zips) + 1,
    len(YEAR_EDGES) + 2,
  )
  return MovieLens(
    source=raw.source,
    n_users=len(uids),
    n_items=len(iids),
    user=np.array([u_index[u] for u in raw.user.tolist()], np.int32),
    item=np.array([i_index[v] for v in raw.item.tolist()], np.int32),
    rating=raw.rating.astype(np.float32),
    timestamp=raw.timestamp.astype(np.int64),
    user_side=user_side,
    item_side=item_side,
    item_genres=item_genres,
    side_vocab=side_vocab,
    genre_vocab=len(names) + 1,
    user_ids=np.concatenate([[-1], uids]),
    item_ids=np.concatenate([[-1], iids]),
  )


def subset(data: MovieLens, max_users: int | None) -> MovieLens:
  """The interactions of the first ``max_users`` users (all ids kept)."""
  if max_users is None or max_users >= data.n_users:
    return data
  keep = data.user <= max_users
  return dataclasses.replace(
    data,
    user=data.user[keep],
    item=data.item[keep],
    rating=data.rating[keep],
    timestamp=data.timestamp[keep],
  )


# ----------------------------------------------------------------- split


def split(data: MovieLens, holdout: int = 1) -> Split:
  """Leave-last-out by time: per user, the last ``holdout`` interactions are
  the test split, the ``holdout`` before them the validation split, the rest
  training. Interactions of one user with equal timestamps are ordered by
  item index (the same order for both file layouts). Users with fewer than
  ``2 * holdout + 1`` interactions are kept in training only.
  """
  if holdout < 1:
    raise ValueError(f"holdout must be >= 1, got {holdout}")
  order = np.lexsort((data.item, data.timestamp, data.user))
  user = data.user[order]
  starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
  ends = np.r_[starts[1:], user.size]
  part = np.zeros(user.size, np.int8)  # 0 train, 1 val, 2 test
  for s, e in zip(starts, ends):
    if e - s >= 2 * holdout + 1:
      part[e - holdout : e] = 2
      part[e - 2 * holdout : e - holdout] = 1

  def take(k):
    idx = order[part == k]
    return {"user": data.user[idx], "item": data.item[idx], "rating": data.rating[idx]}

  train = take(0)  # sorted by user, then time
  counts = np.bincount(train["user"], minlength=data.n_users + 1)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  train["pos"] = (np.arange(train["user"].size) - first[train["user"]]).astype(np.int32)
  seq = np.zeros((data.n_users + 1, max(1, int(counts.max()))), np.int32)
  seq[train["user"], train["pos"]] = train["item"]
  held = []
  for k in (1, 2):
    rows = take(k)
    rows["pos"] = counts[rows["user"]].astype(np.int32)  # every training interaction is earlier
    held.append(rows)
  return Split(train, held[0], held[1], holdout, seq)


def interacted(data: MovieLens, rows: dict | None = None) -> np.ndarray:
  """``(n_users + 1, n_items + 1)`` bool: user has interacted with item (in
  ``rows``, default every interaction). Column 0 (padding) is ``True``."""
  m = np.zeros((data.n_users + 1, data.n_items + 1), bool)
  u = data.user if rows is None else rows["user"]
  v = data.item if rows is None else rows["item"]
  m[u, v] = True
  m[:, 0] = True
  return m


def training_rows(data: MovieLens, sp: Split, neg_ratio: int, seed: int) -> dict:
  """Training rows: every training interaction (click 1, like ``rating >=
  4``, its rating) and ``neg_ratio`` sampled unobserved items per
  interaction (click 0; like and rating masked out; the history position
  ``pos`` of the interaction they were drawn for).

  Negatives are drawn uniformly (with replacement across rows) from the
  items the user has no *training* interaction with, with a NumPy generator
  seeded by ``seed`` (the same rows for every method and run).
  """
  tr = sp.train
  n = tr["user"].size
  seen = interacted(data, tr)
  rng = np.random.default_rng((seed, 7))
  users = np.repeat(tr["user"], neg_ratio)
  items = rng.integers(1, data.n_items + 1, users.size)
  bad = seen[users, items]
  if neg_ratio and np.any(seen[1:, 1:].all(axis=1)[users - 1]):
    raise ValueError("a user has interacted with every item: no negatives to sample")
  while bad.any():
    items[bad] = rng.integers(1, data.n_items + 1, int(bad.sum()))
    bad = seen[users, items]
  m = users.size
  return {
    "user": np.concatenate([tr["user"], users]).astype(np.int32),
    "item": np.concatenate([tr["item"], items]).astype(np.int32),
    "pos": np.concatenate([tr["pos"], np.repeat(tr["pos"], neg_ratio)]).astype(np.int32),
    "click": np.concatenate([np.ones(n), np.zeros(m)]).astype(np.float32),
    "like": np.concatenate([(tr["rating"] >= 4).astype(np.float32), np.zeros(m)]).astype(
      np.float32
    ),
    "rating": np.concatenate([tr["rating"], np.zeros(m)]).astype(np.float32),
    "observed": np.concatenate([np.ones(n), np.zeros(m)]).astype(np.float32),
  }


def eval_candidates(data: MovieLens, rows: dict, num_negatives: int, seed) -> np.ndarray:
  """``(n, 1 + num_negatives)`` item indices per held-out interaction: the
  held-out item in column 0, then ``num_negatives`` distinct items the user
  never interacted with (in any split), drawn uniformly with a generator
  seeded by ``seed`` (an int or a tuple of ints)."""
  seen = interacted(data)
  rng = np.random.default_rng([*np.atleast_1d(seed).ravel().tolist(), 11])
  out = np.zeros((rows["user"].size, 1 + num_negatives), np.int32)
  out[:, 0] = rows["item"]
  for k, u in enumerate(rows["user"].tolist()):
    pool = np.flatnonzero(~seen[u])
    if pool.size < num_negatives:
      raise ValueError(
        f"user index {u} has {pool.size} items never interacted with, fewer than "
        f"the {num_negatives} sampled negatives"
      )
    out[k, 1:] = rng.choice(pool, num_negatives, replace=False)
  return out
