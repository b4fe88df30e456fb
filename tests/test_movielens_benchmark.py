"""benchmarks/movielens_benchmark.py: the loaders (GroupLens and RecBole
layouts, on small generated files), the split, negative sampling, the
metrics, the report and the --quick run end to end."""

import math
import os
import sys
import zipfile

import numpy as np
import pytest
from script_runs import run_quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "movielens_benchmark.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import tuning  # noqa: E402
from census_bench import methods as CM  # noqa: E402
from movielens_bench import data as D  # noqa: E402
from movielens_bench import metrics as X  # noqa: E402
from movielens_bench import report  # noqa: E402
from movielens_bench.training import RunResult  # noqa: E402

OCCUPATIONS = ("artist", "doctor", "engineer", "student")


def make_movielens(seed=0, n_users=24, n_items=140):
  """A small MovieLens-like data set (plain Python values)."""
  rng = np.random.default_rng(seed)
  users = {}
  for u in range(1, n_users + 1):
    age = int(rng.integers(10, 70))
    zipc = "K1A0B" if u % 7 == 0 else f"{int(rng.integers(0, 100000)):05d}"
    users[u] = (age, "MF"[u % 2], OCCUPATIONS[u % len(OCCUPATIONS)], zipc)
  items = {}
  for v in range(1, n_items + 1):
    year = None if v % 17 == 0 else int(rng.integers(1930, 1999))
    k = int(rng.integers(0, 4))
    genres = tuple(sorted(rng.choice(D.GENRES, size=k, replace=False).tolist(), key=D.GENRES.index))
    items[v] = (year, genres)
  inter = []
  for u in range(1, n_users + 1):
    picked = rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(6, 25)), replace=False)
    base = 880_000_000 + int(rng.integers(0, 10**6))
    for v in picked:
      t = base + int(rng.integers(0, 6)) * 100  # many equal timestamps
      inter.append((u, int(v), int(rng.integers(1, 6)), t))
  return users, items, inter


def write_grouplens(d, users, items, inter):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "u.data"), "w") as f:
    f.writelines(f"{u}\t{v}\t{r}\t{t}\n" for u, v, r, t in inter)
  with open(os.path.join(d, "u.user"), "w") as f:
    f.writelines(f"{u}|{a}|{g}|{o}|{z}\n" for u, (a, g, o, z) in users.items())
  with open(os.path.join(d, "u.genre"), "w") as f:
    f.writelines(f"{g}|{i}\n" for i, g in enumerate(D.GENRES))
    f.write("\n")
  with open(os.path.join(d, "u.item"), "w", encoding="latin-1") as f:
    for v, (year, genres) in items.items():
      date = f"01-Jan-{year}" if year else ""
      flags = "|".join("1" if g in genres else "0" for g in D.GENRES)
      f.write(f"{v}|Movie {v} (é)|{date}||http://x/{v}|{flags}\n")


def write_recbole(d, users, items, inter, stem="ml-100k"):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, f"{stem}.inter"), "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    f.writelines(f"{u}\t{v}\t{r}\t{t}\n" for u, v, r, t in inter)
  with open(os.path.join(d, f"{stem}.user"), "w") as f:
    f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
    f.writelines(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, (a, g, o, z) in users.items())
  with open(os.path.join(d, f"{stem}.item"), "w") as f:
    f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    for v, (year, genres) in items.items():
      f.write(f"{v}\tMovie {v}\t{year or ''}\t{' '.join(genres)}\n")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  base = tmp_path_factory.mktemp("ml")
  users, items, inter = make_movielens()
  write_grouplens(str(base / "grouplens" / "ml-100k"), users, items, inter)
  write_recbole(str(base / "recbole"), users, items, inter)
  return base, users, items, inter


def test_both_layouts_read_the_same_data(generated):
  base, users, items, inter = generated
  g = D.read(str(base / "grouplens"))  # finds the ml-100k/ subfolder
  r = D.read(str(base / "recbole"))
  assert (g.source, r.source) == ("grouplens", "recbole")
  for raw in (g, r):
    np.testing.assert_array_equal(raw.user, [x[0] for x in inter])
    np.testing.assert_array_equal(raw.item, [x[1] for x in inter])
    np.testing.assert_array_equal(raw.rating, [x[2] for x in inter])
    np.testing.assert_array_equal(raw.timestamp, [x[3] for x in inter])
    assert raw.users == users and raw.items == items
  eg, er = D.encode(g), D.encode(r)
  for f in ("user", "item", "rating", "user_side", "item_side", "item_genres"):
    np.testing.assert_array_equal(getattr(eg, f), getattr(er, f), err_msg=f)
  assert eg.side_vocab == er.side_vocab and eg.genre_vocab == er.genre_vocab


def test_encoding_by_hand(generated):
  base, users, items, _ = generated
  ml = D.encode(D.read(str(base / "recbole")))
  assert ml.n_users == len(users) and ml.n_items == len(items)
  # Ages 17 / 18 / 24 / 25 / 55 / 56 fall in buckets 1 / 2 / 2 / 3 / 6 / 7 (0 unknown).
  for age, bucket in ((17, 1), (18, 2), (24, 2), (25, 3), (55, 6), (56, 7), (None, 0)):
    assert D._bucket(age, D.AGE_EDGES) == bucket
  for year, bucket in ((1959, 1), (1960, 2), (1989, 4), (1994, 5), (1995, 6), (1998, 8)):
    assert D._bucket(year, D.YEAR_EDGES) == bucket
  occ = {o: i + 1 for i, o in enumerate(sorted(OCCUPATIONS))}
  for u, (age, gender, o, z) in users.items():
    idx = int(np.flatnonzero(ml.user_ids == u)[0])
    a, g, oc, zp = ml.user_side[idx]
    assert a == D._bucket(age, D.AGE_EDGES) and oc == occ[o]
    assert g == {"F": 1, "M": 2}[gender]
    zips = sorted({(x[3][0] if x[3][0].isdigit() else "other") for x in users.values()})
    assert zp == zips.index(z[0] if z[0].isdigit() else "other") + 1
  for v, (year, genres) in items.items():
    idx = int(np.flatnonzero(ml.item_ids == v)[0])
    assert ml.item_side[idx, 0] == D._bucket(year, D.YEAR_EDGES)
    got = [D.GENRES[i - 1] for i in ml.item_genres[idx] if i]
    assert got == sorted(genres, key=D.GENRES.index)


def test_missing_files_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--fetch"):
    D.read(str(tmp_path))


def _encoded(generated):
  base = generated[0]
  return D.encode(D.read(str(base / "recbole")))


def test_leave_last_out_split(generated):
  ml = _encoded(generated)
  sp = D.split(ml, holdout=1)
  by_user = {}
  for u, v, t in zip(ml.user, ml.item, ml.timestamp):
    by_user.setdefault(int(u), []).append((int(t), int(v)))
  assert sp.val["user"].size == sp.test["user"].size == len(by_user)
  for k, u in enumerate(sp.test["user"].tolist()):
    seq = sorted(by_user[u])  # time, then item index
    assert sp.test["item"][k] == seq[-1][1] and sp.val["item"][k] == seq[-2][1]
    train = sp.train["item"][sp.train["user"] == u].tolist()
    assert train == [v for _, v in seq[:-2]]  # in time order
    assert sp.test["pos"][k] == sp.val["pos"][k] == len(train)
    assert sp.sequences[u, : len(train)].tolist() == train
    np.testing.assert_array_equal(sp.train["pos"][sp.train["user"] == u], np.arange(len(train)))
  assert sp.train["user"].size + 2 * len(by_user) == ml.user.size
  # holdout 2: two each; a user with fewer than 5 interactions would stay in training.
  sp2 = D.split(ml, holdout=2)
  assert sp2.test["user"].size == 2 * len(by_user)
  with pytest.raises(ValueError, match="holdout"):
    D.split(ml, holdout=0)


def test_negative_sampling(generated):
  ml = _encoded(generated)
  sp = D.split(ml)
  rows = D.training_rows(ml, sp, neg_ratio=3, seed=5)
  n = sp.train["user"].size
  assert rows["user"].size == 4 * n
  pos, neg = slice(0, n), slice(n, None)
  np.testing.assert_array_equal(rows["click"][pos], 1)
  np.testing.assert_array_equal(rows["click"][neg], 0)
  np.testing.assert_array_equal(rows["like"][pos], sp.train["rating"] >= 4)
  np.testing.assert_array_equal(rows["observed"][neg], 0)
  np.testing.assert_array_equal(rows["rating"][neg], 0)
  train_pairs = set(zip(sp.train["user"].tolist(), sp.train["item"].tolist()))
  negs = list(zip(rows["user"][neg].tolist(), rows["item"][neg].tolist()))
  assert not train_pairs & set(negs)
  assert all(1 <= v <= ml.n_items for _, v in negs)
  np.testing.assert_array_equal(rows["user"][neg], np.repeat(sp.train["user"], 3))
  np.testing.assert_array_equal(rows["pos"][neg], np.repeat(sp.train["pos"], 3))
  again = D.training_rows(ml, sp, neg_ratio=3, seed=5)
  np.testing.assert_array_equal(again["item"], rows["item"])
  other = D.training_rows(ml, sp, neg_ratio=3, seed=6)
  assert not np.array_equal(other["item"], rows["item"])


def test_eval_candidates(generated):
  ml = _encoded(generated)
  sp = D.split(ml)
  cand = D.eval_candidates(ml, sp.test, 99, seed=3)
  assert cand.shape == (sp.test["user"].size, 100)
  np.testing.assert_array_equal(cand[:, 0], sp.test["item"])
  every = set(zip(ml.user.tolist(), ml.item.tolist()))
  for u, row in zip(sp.test["user"].tolist(), cand):
    assert len(set(row[1:].tolist())) == 99
    assert not any((u, int(v)) in every for v in row[1:])
    assert row[1:].min() >= 1
  np.testing.assert_array_equal(cand, D.eval_candidates(ml, sp.test, 99, seed=3))
  with pytest.raises(ValueError, match="fewer than"):
    D.eval_candidates(ml, sp.test, ml.n_items, seed=3)


def test_hit_ndcg_by_hand():
  scores = np.array(
    [
      [0.9, 0.1, 0.2, 0.3],  # rank 0
      [0.5, 0.9, 0.7, 0.1],  # rank 2
      [0.5, 0.5, 0.9, 0.1],  # one above, one tie: rank 1 or 2, each with prob. 1/2
    ]
  )
  hr, ndcg = X.hit_ndcg(scores, k=2)
  assert hr == pytest.approx((1 + 0 + 0.5) / 3)
  assert ndcg == pytest.approx((1 + 0 + 0.5 / math.log2(3)) / 3)
  hr, ndcg = X.hit_ndcg(scores, k=3)
  assert hr == pytest.approx(1.0)
  want = (1 + 1 / math.log2(4) + 0.5 * (1 / math.log2(3) + 1 / math.log2(4))) / 3
  assert ndcg == pytest.approx(want)
  # A constant model: the held-out item is uniform over the 4 ranks.
  hr, ndcg = X.hit_ndcg(np.zeros((2, 4)), k=1)
  assert hr == pytest.approx(0.25) and ndcg == pytest.approx(0.25)
  with pytest.raises(ValueError):
    X.hit_ndcg(np.zeros(4))


def test_auc_rmse_skill_by_hand():
  # Pairs (pos, neg): (0.8 > 0.3), (0.8 > 0.5), (0.4 > 0.3), (0.4 < 0.5): 3/4.
  assert X.auc([1, 0, 1, 0], [0.8, 0.3, 0.4, 0.5]) == pytest.approx(0.75)
  assert X.auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts 1/2
  assert math.isnan(X.auc([1, 1], [0.1, 0.2]))
  assert X.rmse([1.0, 3.0], [2.0, 5.0]) == pytest.approx(math.sqrt(2.5))
  np.testing.assert_allclose(X.skill(0.75, 0.6, 0.9, 1.2), [0.5, 0.2, 0.25])


def _run(seed, click, like, rmse, ndcg=0.3):
  m = {"click_auc": click, "like_auc": like, "rmse": rmse, "hr": 0.5, "ndcg": ndcg}
  return RunResult(status="ok", val=m, test=m, score=0.1 * seed, steps=10)


def test_report_paired_statistics_by_hand():
  def entry(runs):
    return {
      "trials": [{"lr": 1e-3, "hparams": {}, "score": 0.1, "status": "ok"}],
      "chosen": {"lr": 1e-3, "hparams": {}},
      "runs": runs,
    }

  ew = {s: _run(s, 0.8, 0.7, 1.0) for s in range(3)}
  # click AUC +0.008 / +0.008 / +0.016 (relative 1 %, 1 %, 2 %), like and RMSE equal.
  better = {s: _run(s, 0.8 * (1 + 0.01 * (1 + (s == 2))), 0.7, 1.0) for s in range(3)}
  results = {"mean": entry(ew), "gradcraft": entry(better), "pcgrad": "skipped: test"}
  rows = {r["method"]: r for r in report.summarise(results, ["mean", "gradcraft", "pcgrad"])}
  g = rows["gradcraft"]
  # dm = 100 * mean(rel. click, 0, 0) = 1/3, 1/3, 2/3 %.
  d = np.array([1, 1, 2]) / 3
  assert g["d_dm_mean"] == pytest.approx(d.mean())
  assert g["d_dm_std"] == pytest.approx(d.std(ddof=1))
  half = 4.3026527 * d.std(ddof=1) / math.sqrt(3)  # published t_{0.975, 2}
  assert (g["d_dm_ci95_low"], g["d_dm_ci95_high"]) == pytest.approx(
    (d.mean() - half, d.mean() + half)
  )
  assert g["d_dm_wins"] == 3 and g["d_dm_n"] == 3 and g["d_dm_m"] == 1
  assert g["d_rmse_wins"] == 0 and g["d_rmse_ties"] == 3 and g["d_rmse_decision"] == "tie"
  assert g["click_auc_mean"] == pytest.approx(np.mean([0.808, 0.808, 0.816]))
  assert rows["pcgrad"]["n_ok"] == 0 and "skipped" in rows["pcgrad"]["note"]
  md = report.paired_markdown(list(rows.values()))
  assert "gradcraft" in md and "(3/3)" in md and "pcgrad" in md  # listed as not compared
  assert "lr 0.001" in report.table_markdown(list(rows.values()))
  csv_text = report.table_csv(
    {"shared_bottom": list(rows.values())}, {"command": "x", "commit": "y"}
  )
  assert csv_text.startswith("# command: x\n# commit: y\n")


def test_tuning_settings_build_every_method():
  """Each listed hyperparameter setting is a valid argument of its factory,
  and the budget is the same learning-rate grid for every entry."""
  names = CM.library_method_names()
  for name, (settings, _) in tuning.HPARAMS.items():
    assert name in names or name in (report.SINGLE, report.NMT) or name in CM.ABLATION, name
    for hp in settings:
      tx = CM.make_method(name, 3, 0, hp)
      assert tx is not None
  for name in names + [report.SINGLE, report.NMT]:
    g = tuning.grid(name, [1e-3, 3e-3], 2)
    assert sorted({lr for lr, _ in g}) == [1e-3, 3e-3]
    assert len(g) == 2 * min(2, max(1, len(tuning.HPARAMS.get(name, ([], ""))[0])))
  assert tuning.settings("not_a_method", 3) == [{}]


def test_docs_list_the_tuned_settings():
  """docs/movielens.md lists every method's settings as movielens_bench/tuning.py tries them."""
  with open(os.path.join(ROOT, "docs", "movielens.md"), encoding="utf-8") as f:
    rows = [ln for ln in f if ln.startswith("| `")]
  for name, (settings, _) in tuning.HPARAMS.items():
    row = [r for r in rows if f"`{name}`" in r.split("|")[1]]
    if not settings:
      assert not row, name
      continue
    assert len(row) == 1, name
    keys = list(settings[0])
    if len(keys) == 1:
      want = f"`{keys[0]}` " + ", ".join(f"{s[keys[0]]:g}" for s in settings)
    else:
      values = ", ".join("(" + ", ".join(f"{s[k]:g}" for k in keys) + ")" for s in settings)
      want = "(" + ", ".join(f"`{k}`" for k in keys) + ") " + values
    assert want in row[0], (name, want, row[0])


def test_fetch_falls_back_to_the_recbole_wheel(tmp_path, monkeypatch, generated):
  """GroupLens unreachable: the files come out of the RecBole wheel that
  ``pip download`` saves (here a generated wheel), and SOURCE.txt says so."""
  _, users, items, inter = generated
  src = tmp_path / "atomic"
  write_recbole(str(src), users, items, inter)

  def no_network(*a, **k):
    raise OSError("network unreachable")

  def fake_pip(cmd, **kwargs):
    assert cmd[1:5] == ["-m", "pip", "download", D.RECBOLE_SPEC] and "--no-deps" in cmd
    dest = cmd[cmd.index("-d") + 1]
    with zipfile.ZipFile(os.path.join(dest, "recbole-1.2.1-py3-none-any.whl"), "w") as z:
      for name in D.RECBOLE_FILES:
        z.write(src / name, D.RECBOLE_PREFIX + name)

    class Done:
      returncode, stdout, stderr = 0, "", ""

    return Done()

  monkeypatch.setattr(D.urllib.request, "urlopen", no_network)
  monkeypatch.setattr(D.subprocess, "run", fake_pip)
  cache = tmp_path / "cache"
  logs = []
  assert D.fetch(str(cache), log=logs.append) == str(cache)
  assert any("GroupLens failed" in m for m in logs)
  assert D.source_note(str(cache)).startswith("PyPI recbole==1.2.1")
  assert D.read(str(cache)).source == "recbole"
  # Cached: no download the second time.
  monkeypatch.setattr(D.subprocess, "run", no_network)
  D.fetch(str(cache), log=logs.append)
  assert "using the cached" in logs[-1]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, generated):
  """The --quick run on the generated GroupLens files: two seeds (paired
  statistics), equal weighting, GradCraft, the single-task models and NMT."""
  base = generated[0]
  out = tmp_path / "out"
  proc = run_quick(
    SCRIPT,
    out,
    "--data-dir",
    str(base / "grouplens"),
    "--methods",
    "mean,gradcraft,single_task,nmt",
    "--seeds",
    "2",
    "--max-users",
    "24",
    "--batch-size",
    "128",
  )
  for f in (
    "movielens_table.md",
    "movielens_table.csv",
    "movielens_results.json",
    "movielens_dm.png",
  ):
    assert (out / f).is_file() and (out / f).stat().st_size > 0, f
  meta, rows = report.read_csv(str(out / "movielens_table.csv"))
  assert {"command", "date", "commit", "machine", "data"} <= set(meta)
  assert "--quick" in meta["command"] and "grouplens" in meta["data"]
  by = {r["method"]: r for r in rows}
  assert list(by) == ["mean", "single_task", "gradcraft", "nmt"]
  for name, r in by.items():
    assert int(r["n_ok"]) == 2, (name, r["note"])
    assert 0.0 <= float(r["click_auc_mean"]) <= 1.0 and float(r["rmse_mean"]) > 0
    assert 0.0 <= float(r["ndcg_mean"]) <= float(r["hr_mean"]) <= 1.0
    if name != "mean":
      assert r["d_dm_decision"] in ("better", "worse", "tie") and int(r["d_dm_n"]) == 2
  md = (out / "movielens_table.md").read_text()
  assert "Tuning budget" in md and "Holm" in md and meta["commit"] in md
  assert "wall time" in proc.stdout
