"""recommend and evaluate as a practitioner's tool: item files of every common shape,
checked against the run's dataset; tables written in the format their name says; --json
that is the only thing on stdout; user ids taken once each."""

import json
import subprocess
import sys

import polars as pl
import pytest

import fastattrec as fa
from fastattrec.errors import UserError

from helpers import cli, trained_on_histories, write

# A hand-written log (user::item::rating::time) over items 101..108. Each user's history,
# so the items left to recommend to each are known without the code: the unseen ones.
HISTORY = {1: [101, 102, 103, 104], 2: [102, 103, 105], 3: [101, 106, 107, 108],
           4: [104, 105, 106], 5: [107, 108, 101], 6: [103, 104, 105, 106]}
ITEMS = list(range(101, 109))
UNSEEN = {u: sorted(set(ITEMS) - set(h)) for u, h in HISTORY.items()}
TITLES = {101: "Amélie (2001)", 102: "Alpha, The (1995)", 103: "Beta (1996)",
          104: "Gamma (1997)", 105: "Delta (1998)", 106: "Epsilon (1999)",
          107: "Zeta (2000)", 108: "Eta (2002)"}
COLUMNS = ["raw_user", "rank", "raw_item", "score"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recout")
    return trained_on_histories(root, HISTORY, epochs=1, batch_size=16)


def error_line(r):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    return r.output.strip().splitlines()[-1]


def rows_of(r):
    """The rows a `--json` command printed: stdout must be one JSON document."""
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def check_lists(rows, users, k, titles=None):
    """Each user's ranks are 1..n, n = min(k, unseen), all of them unseen items (and the
    title of each row is the one written in the item file)."""
    assert [r["raw_user"] for r in rows] == [u for u in users
                                             for _ in range(min(k, len(UNSEEN[u])))]
    for u in users:
        mine = [r for r in rows if r["raw_user"] == u]
        assert [r["rank"] for r in mine] == list(range(1, len(mine) + 1))
        assert set(r["raw_item"] for r in mine) <= set(UNSEEN[u])
        assert [r["score"] for r in mine] == sorted((r["score"] for r in mine), reverse=True)
    if titles is not None:
        assert all(r["title"] == titles.get(r["raw_item"]) for r in rows), rows


# ---- item files: every shape, checked against the dataset -------------------------------

def movies_dat(path, ids=ITEMS):
    text = "".join(f"{i}::{TITLES.get(i, f'Other {i}')}::Drama\n" for i in ids)
    return path.write_bytes(text.encode("latin-1")) and path


def u_item(path, ids=ITEMS):
    text = "".join(f"{i}|{TITLES.get(i, f'Other {i}')}|01-Jan-1995||http://x/{i}|0|1|0\n"
                   for i in ids)
    return path.write_bytes(text.encode("latin-1")) and path


def recbole_item(path, ids=ITEMS):
    text = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + \
        "".join(f"{i}\t{TITLES.get(i, f'Other {i}')}\t1995\tDrama\n" for i in ids)
    return path.write_bytes(text.encode("utf-8")) and path


def movies_csv(path, ids=ITEMS):
    def q(t):
        return '"' + t.replace('"', '""') + '"' if "," in t else t
    text = "movieId,title,genres\n" + "".join(
        f"{i},{q(TITLES.get(i, f'Other {i}'))},Drama\n" for i in ids)
    return path.write_bytes(text.encode("utf-8")) and path


def items_tsv(path, ids=ITEMS):
    text = "item_id\ttitle\n" + "".join(f"{i}\t{TITLES.get(i, f'Other {i}')}\n" for i in ids)
    return path.write_bytes(text.encode("utf-8")) and path


def items_parquet(path, ids=ITEMS):
    pl.DataFrame({"raw_item": ids, "title": [TITLES.get(i, f"Other {i}") for i in ids]}
                 ).write_parquet(path)
    return path


def items_parquet_text_ids(path, ids=ITEMS):
    pl.DataFrame({"item": [str(i) for i in ids],
                  "name": [TITLES.get(i, f"Other {i}") for i in ids]}).write_parquet(path)
    return path


FORMATS = [("movies.dat", movies_dat), ("u.item", u_item), ("ml.item", recbole_item),
           ("movies.csv", movies_csv), ("items.tsv", items_tsv),
           ("items.parquet", items_parquet), ("ids.parquet", items_parquet_text_ids)]


@pytest.mark.parametrize("name,make", FORMATS)
def test_each_item_file_shape_gives_the_titles_it_holds(run_dir, tmp_path, name, make):
    f = make(tmp_path / name)
    rows = rows_of(cli("recommend", run_dir, "--user", "1", "--items", f, "--json"))
    check_lists(rows, [1], 10, TITLES)
    via_api = fa.load_run(run_dir).recommend(users=[3], k=2, titles=f)
    assert via_api.get_column("title").to_list() == [TITLES[i] for i in via_api["raw_item"]]


def test_movies_is_still_the_same_option(run_dir, tmp_path):
    r = cli("recommend", run_dir, "--user", "2", "--movies", movies_dat(tmp_path / "m.dat"))
    assert r.exit_code == 0, r.output
    assert all(TITLES[i] in r.stdout for i in UNSEEN[2])


def test_a_file_lacking_an_item_is_refused_unless_allowed(run_dir, tmp_path):
    f = movies_dat(tmp_path / "movies.dat", [i for i in ITEMS if i != 105])
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", f, "--json"))
    assert "has no title for 1 of the 8 items" in msg and "'105'" in msg
    assert "--allow-missing" in msg
    rows = rows_of(cli("recommend", run_dir, "--user", "1", "--items", f, "--allow-missing",
                       "--json"))
    check_lists(rows, [1], 10, {i: t for i, t in TITLES.items() if i != 105})
    assert any(r["raw_item"] == 105 and r["title"] is None for r in rows)
    with pytest.raises(UserError, match="has no title for 1 of the 8"):
        fa.load_run(run_dir).recommend(users=[1], titles=f)


def test_another_datasets_file_is_refused(run_dir, tmp_path):
    # Like ML-1M's movies.dat given to an ML-100K run: every id of the dataset is there,
    # with titles of other films, among many more ids.
    f = movies_dat(tmp_path / "movies.dat", list(range(1, 301)))
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", f))
    assert "looks like another dataset's item file" in msg
    assert "292 of its 300 ids are not the dataset's" in msg
    assert cli("recommend", run_dir, "--user", "1", "--items", f,
               "--allow-missing").exit_code == 0
    # Most of the dataset's items missing: the same sentence.
    few = movies_dat(tmp_path / "few.dat", [101, 102, 103])
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", few))
    assert "looks like another dataset's" in msg and "5 of the 8 items" in msg


def test_a_file_sharing_no_id_is_refused_even_when_allowed(run_dir, tmp_path):
    f = u_item(tmp_path / "u.item", [1, 2, 3])
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", f,
                         "--allow-missing"))
    assert "none of the 3 ids" in msg and "another dataset" in msg


def test_recbole_header_problems_name_the_columns_plainly(run_dir, tmp_path):
    f = write(tmp_path / "ml.item", "item_id:token\trelease_year:token\n101\t1995\n")
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", f))
    assert "has no title column" in msg and "item_id:token, release_year:token" in msg
    assert "\\x09" not in msg and "\\t" not in msg
    short = write(tmp_path / "short.item", "item_id:token\tmovie_title:token_seq\n101\n")
    assert "line 2" in error_line(cli("recommend", run_dir, "--user", "1", "--items", short))


def test_csv_item_file_problems(run_dir, tmp_path):
    nocol = write(tmp_path / "a.csv", "id,name_of_film\n101,x\n")
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", nocol))
    assert "has no item id column" in msg and "'id, name_of_film'" in msg
    dup = write(tmp_path / "b.csv", "movieId,title\n101,a\n102,b\n101,c\n")
    msg = error_line(cli("recommend", run_dir, "--user", "1", "--items", dup))
    assert "line 4" in msg and "already appeared on line 2" in msg


def test_api_titles_frame_is_checked_the_same_way(run_dir):
    run = fa.load_run(run_dir)
    part = pl.DataFrame({"raw_item": [101, 102], "title": ["a", "b"]})
    with pytest.raises(UserError, match="^titles looks like another dataset's"):
        run.recommend(users=[1], titles=part)
    recs = run.recommend(users=[4], k=2, titles=part, allow_missing=True)
    assert recs.get_column("title").to_list() == [{101: "a", 102: "b"}.get(i)
                                                  for i in recs["raw_item"]]


# ---- tables written in the format their name says -----------------------------------------

def read_any(path):
    ext = path.suffix
    if ext == ".csv":
        assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
        return pl.read_csv(path).to_dicts()
    if ext == ".parquet":
        return pl.read_parquet(path).to_dicts()
    if ext == ".json":
        rows = json.loads(path.read_text())
        assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
        return rows
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".json", ".jsonl"])
def test_all_users_table_in_each_format(run_dir, tmp_path, ext):
    out = tmp_path / f"recs{ext}"
    r = cli("recommend", run_dir, "--all-users", "-k", "3", "-o", out)
    assert r.exit_code == 0, r.output
    rows = read_any(out)
    assert list(rows[0]) == COLUMNS
    check_lists(rows, sorted(HISTORY), 3)
    api = fa.load_run(run_dir).recommend(k=3).to_dicts()
    assert [(r["raw_user"], r["raw_item"]) for r in rows] == \
        [(r["raw_user"], r["raw_item"]) for r in api]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in api], rel=1e-6)
    assert not list(tmp_path.glob(".*tmp-*")) and not list(tmp_path.glob(".*.lock"))


def test_one_users_list_to_a_file_with_titles(run_dir, tmp_path):
    out = tmp_path / "x.csv"
    r = cli("recommend", run_dir, "--user", "3", "-o", out, "--items",
            movies_dat(tmp_path / "movies.dat"))
    assert r.exit_code == 0, r.output
    rows = pl.read_csv(out).to_dicts()
    check_lists(rows, [3], 10, TITLES)
    assert "wrote 4 recommendations for user 3" in r.output


def test_an_unknown_extension_is_one_sentence_and_writes_nothing(run_dir, tmp_path):
    for cmd in (("recommend", run_dir, "--all-users"), ("evaluate", run_dir)):
        msg = error_line(cli(*cmd, "-o", tmp_path / "out.txt"))
        assert ".csv, .parquet, .json" in msg and ".jsonl" in msg and "out.txt" in msg
    assert list(tmp_path.iterdir()) == []


def test_force_rules_for_a_csv_table(run_dir, tmp_path):
    out = tmp_path / "recs.csv"
    base = ("recommend", run_dir, "--all-users", "-k", "2", "-o", out)
    assert cli(*base).exit_code == 0
    assert "already exists" in error_line(cli(*base))
    assert cli(*base, "--force").exit_code == 0
    out.write_text(out.read_text() + "9,1,101,0.5\n")  # changed since: no longer ours
    assert "did not make" in error_line(cli(*base, "--force"))
    mine = tmp_path / "mine.json"
    mine.write_text("[]")
    assert "did not make" in error_line(cli("recommend", run_dir, "--all-users", "-o", mine,
                                            "--force"))
    assert mine.read_text() == "[]"
    metrics = tmp_path / "m.csv"
    assert cli("evaluate", run_dir, "-o", metrics, "--protocol", "sampled").exit_code == 0
    # A metrics table is evaluate's, not recommend's to replace.
    assert "did not make" in error_line(cli("recommend", run_dir, "--all-users", "-o",
                                            metrics, "--force"))


def test_evaluate_writes_its_metrics_table(run_dir, tmp_path):
    out = tmp_path / "metrics.json"
    r = cli("evaluate", run_dir, "-k", "2", "--protocol", "sampled", "-o", out)
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    ev = json.loads((run_dir / "eval.json").read_text())
    assert [(x["model"], x["protocol"]) for x in rows] == [("AttRec", "sampled"),
                                                           ("popularity", "sampled")]
    for x in rows:
        m = ev["results"][x["model"]]["sampled"]
        assert (x["HR@2"], x["NDCG@2"], x["MRR"], x["users"]) == \
            (m["HR@2"], m["NDCG@2"], m["MRR"], m["users"])
        assert (x["checkpoint"], x["epoch"]) == (ev["checkpoint"], ev["epoch"])
    msg = error_line(cli("evaluate", run_dir, "-o", run_dir / "eval.json"))
    assert "eval.json" in msg and "choose another -o" in msg


# ---- --json: one document on stdout, nothing else -----------------------------------------

def test_recommend_json_is_the_only_thing_on_stdout(run_dir):
    r = subprocess.run([sys.executable, "-m", "fastattrec", "recommend", str(run_dir),
                        "--user", "6", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    check_lists(json.loads(r.stdout), [6], 10)
    every = rows_of(cli("recommend", run_dir, "--all-users", "-k", "1", "--json"))
    check_lists(every, sorted(HISTORY), 1)
    assert "give one of them" in error_line(cli("recommend", run_dir, "--user", "1", "--json",
                                                "-o", "x.csv"))


def test_evaluate_json_is_eval_json(run_dir):
    r = cli("evaluate", run_dir, "-k", "3", "--json")
    got = rows_of(r)
    assert got == json.loads((run_dir / "eval.json").read_text())
    assert set(got["results"]) == {"AttRec", "popularity"}


def test_evaluate_json_when_eval_json_cannot_be_saved(run_dir):
    from fastattrec.outputs import exclusive_lock

    with exclusive_lock(run_dir):  # another command holds the run: eval.json is not written
        r = cli("evaluate", run_dir, "-k", "3", "--json", "--protocol", "full")
    assert r.exit_code != 0 and "not saved" in r.stderr
    assert set(json.loads(r.stdout)["results"]["AttRec"]) == {"full"}


# ---- user ids: each once, unknown ones named ------------------------------------------------

def test_api_takes_each_user_once(run_dir):
    run = fa.load_run(run_dir)
    recs = run.recommend(users=["2", 2, 5, "5", 2], k=2)
    assert recs.get_column("raw_user").to_list() == [2, 2, 5, 5]
    alone = run.recommend(users=[2], k=2)
    assert recs.head(2).get_column("raw_item").to_list() == alone["raw_item"].to_list()
    with pytest.raises(UserError, match=r"^user 42 \(and 1 other given user\) is not in"):
        run.recommend(users=[1, 42, "43"])
