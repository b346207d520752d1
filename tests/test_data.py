"""Loaders on small real files of each source format, their failure modes, and the split."""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import replace

import pytest

from lcrec_chat.config import DataConfig
from lcrec_chat.data import (DataError, Split, leave_one_out, load_amazon, load_dataset,
                             load_lcrec, load_ml100k)
from lcrec_chat.data.amazon import clean_text
from lcrec_chat.data.dataset import Dataset, Item
from lcrec_chat.data.filters import first_users, k_core
from lcrec_chat.data.movielens import load_movielens, natural_title
from lcrec_chat.data.textio import iter_lines


def write_lines(path, lines, newline="\n"):
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- MovieLens atomic files

ML_ITEMS = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "10\tLion King, The\t1994\tAnimation Children's Musical",
    "20\tHeat\t1995\tAction Crime Thriller",
    "30\tLand Before Time III (1995)\tV\tunknown",
    "40\tNobody Rated Me\t1999\tDrama",
]
# columns deliberately in another order than RecBole writes them; u1 rates 20 and 30 at the
# same second (30 first in the file), u2 has its ratings out of time order
ML_INTER = [
    "timestamp:float\tuser_id:token\titem_id:token\trating:float",
    "300\tu1\t30\t4",
    "300\tu1\t20\t4",
    "100\tu1\t10\t4",
    "50\tu2\t20\t4",
    "20\tu2\t10\t4",
    "881250949.0\tu2\t30\t4",
]


def ml_folder(tmp_path, items=ML_ITEMS, inter=ML_INTER, newline="\n"):
    write_lines(tmp_path / "toy.item", items, newline)
    write_lines(tmp_path / "toy.inter", inter, newline)
    return tmp_path


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_movielens_reads_typed_headers_and_sorts_stably(tmp_path, newline):
    ds = load_movielens(ml_folder(tmp_path, newline=newline), "toy")
    assert [it.id for it in ds.items] == ["10", "20", "30", "40"]  # file order, unrated item kept
    lion, _, land, _ = ds.items
    assert (lion.title, lion.year, lion.genres) == ("Lion King, The", 1994, ["Animation", "Children's", "Musical"])
    assert (land.year, land.genres) == (1995, [])  # "V" is no year: taken from the title; "unknown" dropped
    assert list(ds.sequences) == ["u1", "u2"]          # users in order of first appearance
    assert ds.sequences["u1"] == [0, 2, 1]             # tie at t=300 keeps file order: 30 before 20
    assert ds.sequences["u2"] == [0, 1, 2]
    assert ds.num_interactions == 6 and ds.skipped == {}
    assert ds.domain == "movie"                        # the words of the prompts: watched movies


def test_movielens_timestamps_are_exact_integers(tmp_path):
    # 2**53 + 1 and 2**53 are equal as floats; as integers the second row comes first
    inter = ML_INTER[:1] + ["9007199254740993\tu1\t10\t4", "9007199254740992\tu1\t20\t4", "1\tu1\t30\t4"]
    ds = load_movielens(ml_folder(tmp_path, inter=inter), "toy")
    assert ds.sequences["u1"] == [2, 1, 0]


def test_movielens_unknown_item_is_skipped_and_counted(tmp_path):
    ds = load_movielens(ml_folder(tmp_path, inter=ML_INTER + ["5\tu3\t999\t4"]), "toy")
    assert "u3" not in ds.sequences
    assert list(ds.skipped.values()) == [1]


def test_movielens_max_users_keeps_first_users_and_all_items(tmp_path):
    ds = load_movielens(ml_folder(tmp_path), "toy", max_users=1)
    assert list(ds.sequences) == ["u1"] and len(ds.items) == 4
    assert ds.domain == "movie" and first_users(replace(ds, domain="product"), 1).domain == "product"


@pytest.mark.parametrize("inter, message", [
    (ML_INTER[:3] + ["400\tu1"], "line 4: expected 4 tab-separated fields"),
    (ML_INTER[:2] + ["soon\tu1\t10\t4"], "line 3: timestamp 'soon'"),
    (["user_id:token\titem_id:token\trating:float"], "no 'timestamp' column"),
    ([], "empty"),
    (ML_INTER[:1], "no ratings"),
])
def test_movielens_bad_interaction_files_name_file_and_line(tmp_path, inter, message):
    folder = ml_folder(tmp_path)
    write_lines(folder / "toy.inter", inter) if inter else (folder / "toy.inter").write_text("")
    with pytest.raises(DataError, match=message) as err:
        load_movielens(folder, "toy")
    assert "toy.inter" in str(err.value)


def test_movielens_duplicate_item_id_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"toy.item: line 3: item_id '10' appears twice"):
        load_movielens(ml_folder(tmp_path, items=ML_ITEMS[:2] + [ML_ITEMS[1]]), "toy")


@pytest.fixture(scope="module")
def ml100k() -> Dataset:
    return load_ml100k()


def test_packaged_ml100k_counts(ml100k):
    ds = ml100k
    assert (len(ds.sequences), len(ds.items), ds.num_interactions) == (943, 1682, 100_000)
    assert ds.items[0].title == "Toy Story" and ds.items[0].year == 1995
    assert min(len(s) for s in ds.sequences.values()) >= 20
    assert len({it.title for it in ds.items}) < len(ds.items)  # duplicate titles stay distinct items


def test_natural_title():
    assert natural_title("Lion King, The") == "The Lion King"
    assert natural_title("Postman, The (Postino, Il)") == "The Postman (Postino, Il)"
    assert natural_title("Heat") == "Heat"


# ---------------------------------------------------------------- shared file reading

def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    whole = write_gz(tmp_path / "x.json.gz", [json.dumps({"n": i, "pad": "x" * 50}) for i in range(2000)])
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.json.gz: compressed file is truncated"):
        list(iter_lines(cut))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\nok\n\xff\xfe broken\n")
    with pytest.raises(DataError, match="bad.txt: line 3: not valid UTF-8"):
        list(iter_lines(path))


# ---------------------------------------------------------------- LC-Rec processed json

LC_ITEMS = {
    "0": {"title": "Guitar Strings.", "description": "Nickel wound.", "brand": "Fender",
          "categories": "Musical Instruments,Strings"},
    "2": {"title": "Capo.", "description": ["Spring", "loaded."], "brand": "", "categories": ""},
    "10": {"title": "Tuner.", "description": "", "brand": "Snark", "categories": "Tuners"},
}


def lc_folder(tmp_path, inter, items=LC_ITEMS, codes=None):
    (tmp_path / "Toy.item.json").write_text(json.dumps(items, indent=4))
    (tmp_path / "Toy.inter.json").write_text(json.dumps(inter, indent=4))
    if codes is not None:
        (tmp_path / "Toy.index.json").write_text(json.dumps(codes))
    return tmp_path


def test_lcrec_json_loads_in_id_order(tmp_path):
    folder = lc_folder(tmp_path, {"0": [0, 2, 10], "1": ["10", "0", "7"], "2": []},
                       codes={"0": ["<a_1>"], "10": ["<a_2>"]})
    ds = load_lcrec(folder, "Toy")
    assert [it.id for it in ds.items] == ["0", "2", "10"]  # numeric order, not "10" < "2"
    assert ds.items[0].genres == ["Musical Instruments", "Strings"]
    assert ds.items[1].description == "Spring loaded."
    assert ds.sequences == {"0": [0, 1, 2], "1": [2, 0]}
    assert sum(ds.skipped.values()) == 2  # unknown item 7, empty user 2
    assert ds.domain == "product"         # LC-Rec's datasets are Amazon categories


def test_lcrec_json_errors(tmp_path):
    folder = lc_folder(tmp_path, {"0": [0, 2]})
    text = (folder / "Toy.inter.json").read_text()
    (folder / "Toy.inter.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"Toy.inter.json: line \d+ column \d+: invalid JSON"):
        load_lcrec(folder, "Toy")
    with pytest.raises(DataError, match="item '2': missing or empty 'title'"):
        load_lcrec(lc_folder(tmp_path, {"0": [0]}, items={**LC_ITEMS, "2": {"brand": "x"}}), "Toy")
    with pytest.raises(DataError, match="Toy.index.json: 1 item ids not in the item file"):
        load_lcrec(lc_folder(tmp_path, {"0": [0]}, codes={"99": ["<a_1>"]}), "Toy")


# ---------------------------------------------------------------- Amazon 2018 raw

def meta_line(asin, title, **extra):
    return json.dumps({"asin": asin, "title": title, **extra})


AMAZON_META = [
    meta_line("A1", "Fender &amp; Co <b>Strings</b>", description=["<p>Bright</p>", "tone"],
              brand="by\n    Fender", category=["Musical Instruments", "Strings", "</span></span>junk"]),
    meta_line("A2", "Capo"),
    # 2014 files are Python literals, not JSON
    str({"asin": "A3", "title": "Tuner", "categories": [["Musical Instruments", "Tuners"]]}),
    meta_line("A4", "var aPageStart = (new Date()).getTime();"),  # page script instead of a title
    meta_line("A5", ""),
    json.dumps({"title": "no asin"}),
    "{broken",
    meta_line("A2", "Capo again"),
]
# item,user,rating,timestamp; u1 buys A1 twice (the later one is a repeat), u4 only
# interacts with untitled items, u3 has too few interactions for the 2-core
AMAZON_RATINGS = [
    "A1,u1,5.0,30", "A2,u1,4.0,10", "A1,u1,3.0,40", "A3,u1,5.0,20",
    "A1,u2,5.0,5", "A3,u2,2.0,6", "A2,u2,1.0,6",
    "A2,u3,5.0,1",
    "A4,u4,5.0,1", "A5,u4,5.0,2",
]


def amazon_folder(tmp_path, ratings=AMAZON_RATINGS, meta=AMAZON_META):
    write_lines(tmp_path / "Instruments.csv", ratings)
    write_gz(tmp_path / "meta_Instruments.json.gz", meta)
    return tmp_path


def test_amazon_ratings_csv_cleaning_and_filters(tmp_path):
    ds = load_amazon(amazon_folder(tmp_path), "Instruments", min_interactions=2)
    assert [it.id for it in ds.items] == ["A1", "A2", "A3"]  # meta-file order
    strings = ds.items[0]
    assert strings.title == "Fender & Co Strings"
    assert strings.description == "Bright tone"
    assert strings.brand == "Fender"
    assert strings.genres == ["Musical Instruments", "Strings"]
    assert ds.items[2].genres == ["Musical Instruments", "Tuners"]
    assert ds.sequences == {"u1": [1, 2, 0], "u2": [0, 2, 1]}  # by time; u2's tie keeps file order
    skipped = ds.skipped
    assert skipped["repeated user-item interaction"] == 1
    assert skipped["interaction with an item without usable meta"] == 2
    assert skipped["interaction removed by k-core filtering"] == 1
    assert skipped["item without a usable title"] == 2
    assert skipped["meta line without asin"] == 1
    assert skipped["meta line that is neither JSON nor a Python dict"] == 1
    assert skipped["meta line repeating an asin"] == 1
    assert ds.domain == "product" and ds.stats()["domain"] == "product"


def test_amazon_review_json_lines(tmp_path):
    reviews = [json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": int(t), "overall": float(r)})
               for a, u, r, t in (line.split(",") for line in AMAZON_RATINGS)]
    write_gz(tmp_path / "Instruments_5.json.gz", reviews)
    write_gz(tmp_path / "meta_Instruments.json.gz", AMAZON_META)
    ds = load_amazon(tmp_path, "Instruments", min_interactions=2)
    assert ds.sequences == {"u1": [1, 2, 0], "u2": [0, 2, 1]}


@pytest.mark.parametrize("ratings, message", [
    (AMAZON_RATINGS[:2] + ["A1,u9,5.0"], "Instruments.csv: line 3: expected item,user,rating,timestamp"),
    (AMAZON_RATINGS[:1] + ["A1,u9,5.0,yesterday"], "Instruments.csv: line 2: time 'yesterday'"),
    (["A2,u3,5.0,1"], "no user left"),
])
def test_amazon_bad_ratings(tmp_path, ratings, message):
    with pytest.raises(DataError, match=message):
        load_amazon(amazon_folder(tmp_path, ratings=ratings), "Instruments", min_interactions=2)


def test_amazon_bad_reviews_and_meta(tmp_path):
    write_gz(tmp_path / "meta_Instruments.json.gz", AMAZON_META)
    write_lines(tmp_path / "Instruments.json", [json.dumps({"reviewerID": "u1", "asin": "A1"})])
    with pytest.raises(DataError, match="Instruments.json: line 1: missing unixReviewTime"):
        load_amazon(tmp_path, "Instruments")
    write_lines(tmp_path / "Instruments.json", ['{"reviewerID": "u1", "asin": "A1", "unixRev'])
    with pytest.raises(DataError, match="Instruments.json: line 1: not valid JSON"):
        load_amazon(tmp_path, "Instruments")
    meta = (tmp_path / "meta_Instruments.json.gz").read_bytes()
    (tmp_path / "meta_Instruments.json.gz").write_bytes(meta[: len(meta) // 2])
    with pytest.raises(DataError, match="meta_Instruments.json.gz: compressed file is truncated"):
        load_amazon(tmp_path, "Instruments")
    (tmp_path / "meta_Instruments.json.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="meta_Instruments.json.gz: file is empty"):
        load_amazon(tmp_path, "Instruments")
    with pytest.raises(DataError, match="looked for Other.csv"):
        load_amazon(tmp_path, "Other")


def test_clean_text():
    assert clean_text("A &lt;b&gt;bold&lt;/b&gt;\n\n  claim") == "A bold claim"
    assert clean_text(["one", "", "<br/>two"]) == "one two"
    assert clean_text(None) == ""


# ---------------------------------------------------------------- k-core and subsets

def test_k_core_needs_several_rounds():
    # one pass would only drop u4; that leaves c with one user, then u3 with one item
    sequences = {"u1": ["a", "b"], "u2": ["a", "b"], "u3": ["c", "a"], "u4": ["c"]}
    kept, removed = k_core(sequences, 2)
    assert kept == {"u1": ["a", "b"], "u2": ["a", "b"]}
    assert removed == 3


def test_k_core_result_is_a_k_core():
    rng = random.Random(0)
    sequences = {f"u{u}": rng.sample(range(60), rng.randint(1, 12)) for u in range(80)}
    kept, removed = k_core(sequences, 4)
    counts = {}
    for seq in kept.values():
        for i in seq:
            counts[i] = counts.get(i, 0) + 1
    assert kept and min(map(len, kept.values())) >= 4 and min(counts.values()) >= 4
    assert removed == sum(map(len, sequences.values())) - sum(map(len, kept.values()))
    assert all(kept[u] == [i for i in sequences[u] if i in counts] for u in kept)  # order kept


def test_load_dataset_dispatch_and_max_users(tmp_path):
    folder = lc_folder(tmp_path, {"0": [0, 2, 10], "1": [10, 0, 2]})
    ds = load_dataset(DataConfig(source="lcrec", path=str(folder), name="Toy", max_users=1))
    assert list(ds.sequences) == ["0"] and len(ds.items) == 3
    with pytest.raises(DataError, match="unknown data.source 'netflix' .*ml-100k, ml-1m, lcrec, amazon"):
        load_dataset(DataConfig(source="netflix"))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataConfig(source="amazon"))


# ---------------------------------------------------------------- leave-one-out split

def toy_dataset() -> Dataset:
    items = [Item(id=str(i), title=f"t{i}") for i in range(40)]
    return Dataset("toy", items, {"long": list(range(30)), "three": [30, 31, 32], "two": [33, 34]})


def test_leave_one_out_targets_and_capped_history():
    split = leave_one_out(toy_dataset(), max_history=20)
    long, three = split.users
    assert (long.user, long.valid, long.test, long.train) == ("long", 28, 29, list(range(28)))
    assert split.history(long, "valid") == list(range(8, 28))
    assert split.history(long, "test") == list(range(9, 29))
    assert split.target(long, "valid") == 28 and split.target(long, "test") == 29
    assert split.history(three, "test") == [30, 31] and split.target(three, "test") == 32
    assert split.train_only == {"two": [33, 34]}  # too short to evaluate, still trains
    assert split.train_sequences() == [list(range(28)), [30], [33, 34]]
    pop = split.item_popularity(40)  # training parts only: no valid or test target is counted
    assert pop[28] == pop[29] == pop[31] == pop[32] == 0
    assert pop[0] == pop[30] == pop[33] == 1 and sum(pop) == 28 + 1 + 2
    with pytest.raises(ValueError, match="stage"):
        split.history(long, "train")


def test_held_back_split_and_the_select_stage():
    """train.hold_out_last: the held-back split's training parts lack each user's last n training items (train-only
    sequences too), targets unchanged; the select stage predicts the last training item from those before it, so
    with n = 2 its history ends with an item the held-back training never had, and its target is one too."""
    split = leave_one_out(toy_dataset(), max_history=20)
    long, three = split.users
    held = split.held_back(2)
    assert [u.train for u in held.users] == [list(range(26)), []]
    assert [(u.valid, u.test) for u in held.users] == [(28, 29), (31, 32)]
    assert held.train_only == {"two": []} and held.train_sequences() == [list(range(26))]
    assert split.held_back(0) is split
    assert split.users[0].train == list(range(28))            # the split itself is untouched
    with pytest.raises(ValueError, match=">= 0"):
        split.held_back(-1)
    assert split.target(long, "select") == 27 and split.history(long, "select") == list(range(7, 27))
    learnt = {i for seq in held.train_sequences() for i in seq}
    assert split.target(long, "select") not in learnt and split.history(long, "select")[-1] not in learnt
    with pytest.raises(ValueError, match="select stage needs 2 training items"):
        split.target(three, "select")                          # one training item: nothing to predict it from


def test_selection_split_drops_each_users_last_interactions(tmp_path):
    """data.drop_last: the split of the sequences without their last n items; its test target is the real split's
    last training item and nothing in it is a real valid or test target of that user; a user left with fewer than
    3 items only trains. Through stages.prepare: the run's split.json follows the setting, and a run prepared
    without it keeps its fingerprint (the setting is out of DataConfig's repr and enters only when set)."""
    real = leave_one_out(toy_dataset(), max_history=20)
    selection = leave_one_out(toy_dataset(), max_history=20, drop_last=2)
    (long,) = selection.users                                  # "three" is left with one item: train only
    assert (long.train, long.valid, long.test) == (list(range(26)), 26, 27)
    assert long.test == real.users[0].train[-1] and long.valid == real.users[0].train[-2]
    assert selection.train_only == {"three": [30]}                 # "two" has nothing left
    assert leave_one_out(toy_dataset(), drop_last=0) == real
    with pytest.raises(ValueError, match="drop_last"):
        leave_one_out(toy_dataset(), drop_last=-1)

    from lcrec_chat import stages
    from lcrec_chat.config import load_config
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "data.max_users=5"])
    # the repr a run's prepare print was made of before the setting existed, unchanged
    assert str(cfg.data) == ("DataConfig(source='ml-100k', path='', name='', max_history=20, min_interactions=5, "
                             "max_users=5)")
    stages.prepare(cfg)
    full = Split.load(cfg.run_path / "split.json")
    record = json.loads((cfg.run_path / "stages.json").read_text())
    assert record["prepare"] == stages._fingerprint(cfg.data)   # the print a run made before the setting has
    dropped = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "data.max_users=5", "data.drop_last=2"])
    stages.prepare(dropped)
    shifted = Split.load(cfg.run_path / "split.json")
    assert [u.test for u in shifted.users] == [u.train[-1] for u in full.users]
    for real_user, sel_user in zip(full.users, shifted.users):   # ML-100K: a user rates an item once
        assert real_user.user == sel_user.user
        assert {real_user.valid, real_user.test}.isdisjoint({*sel_user.train, sel_user.valid, sel_user.test})


def test_split_follows_stable_tie_order_from_the_loader(tmp_path):
    # u1's last two ratings share a timestamp: file order decides which one is the test target
    inter = ML_INTER[:1] + ["1\tu1\t40\t4", "5\tu1\t10\t4", "9\tu1\t30\t4", "9\tu1\t20\t4"]
    split = leave_one_out(load_movielens(ml_folder(tmp_path, inter=inter), "toy"))
    (u1,) = split.users
    assert (u1.train, u1.valid, u1.test) == ([3, 0], 2, 1)
    assert leave_one_out(load_movielens(tmp_path, "toy")) == split  # deterministic


def test_split_save_load_and_stats(tmp_path):
    dataset = toy_dataset()
    split = leave_one_out(dataset)
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split
    stats = split.stats()
    assert stats["eval_users"] == 2 and stats["train_only_users"] == 1
    (tmp_path / "bad.json").write_text('{"format": 1, "max_history": 20, "users": [{"user": "x"}]}')
    with pytest.raises(DataError, match="bad.json: malformed split"):
        Split.load(tmp_path / "bad.json")


def test_split_of_packaged_ml100k_users(ml100k):
    split = leave_one_out(first_users(ml100k, 50))
    assert len(split.users) == 50 and not split.train_only
    lengths = {u: len(s) for u, s in ml100k.sequences.items()}
    assert all(len(split.history(u, "test")) == min(20, lengths[u.user] - 1) for u in split.users)
    assert max(len(split.history(u, "valid")) for u in split.users) == 20
