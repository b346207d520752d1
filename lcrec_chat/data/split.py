"""Leave-one-out split by time, the one every method in a run is trained and scored on.

Per user (sequence already sorted by time, ties in source order): the last item is the test
target, the second-to-last the validation target, the rest is training. A model sees at most
`max_history` items: the end of `train` when predicting `valid`, the end of `train + [valid]`
when predicting `test`.

A third stage, `select`, predicts each user's last training item from the training items before it. It is
for choosing between LLM arms whose training held back each user's last two training items (`held_back(2)`,
train.hold_out_last): then its history ends with an item the LLM never read and its target is one it never
wrote, as on test; valid's history is the whole training sequence, which a model tuned on windows of it has
memorised (the model card's "The student learns its windows"). The select stage's caveat: only the LLM held
those items back, the sequential models it reads were trained on them. `leave_one_out(..., drop_last=2)`
(data.drop_last) is the clean form: every model of the run, baselines included, is trained and scored on a split
that ends two items earlier, whose test is the real split's last training item.

Users with fewer than 3 interactions cannot give a train item, a valid and a test target.
They are kept out of `users` (so every `UserSplit` has real targets), and their whole sequence
is kept in `train_only`, which feeds training and popularity but no evaluation. Loaders used
here (MovieLens: >= 20 ratings per user, k-core Amazon, LC-Rec) normally produce none.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..locks import write_atomic
from .dataset import DataError, Dataset

EVAL_STAGES = ("valid", "test")          # the protocol's reported stages, every method on both
SELECT_STAGE = "select"                   # for choosing between LLM arms trained with held_back(2)
STAGES = (SELECT_STAGE, *EVAL_STAGES)
MIN_LENGTH = 3
FORMAT_VERSION = 1


@dataclass
class UserSplit:
    user: str
    train: list[int]
    valid: int
    test: int


@dataclass
class Split:
    users: list[UserSplit]
    max_history: int
    train_only: dict[str, list[int]] = field(default_factory=dict)  # users with < 3 interactions

    def history(self, u: UserSplit, stage: str) -> list[int]:
        """The items a model sees before predicting `target(u, stage)`, oldest first."""
        return past_items(u, stage)[-self.max_history:]

    def target(self, u: UserSplit, stage: str) -> int:
        return target_item(u, stage)

    def held_back(self, n: int) -> Split:
        """The split with each user's last `n` training items (and the last `n` of a train-only sequence) left out of
        its training part: what a model trained with train.hold_out_last = n learns from. Targets are unchanged."""
        if n < 0:
            raise ValueError(f"cannot hold back {n} training items per user (train.hold_out_last must be >= 0)")
        if n == 0:
            return self
        users = [UserSplit(u.user, u.train[:-n], u.valid, u.test) for u in self.users]
        return Split(users, self.max_history, {k: s[:-n] for k, s in self.train_only.items()})

    def train_sequences(self) -> list[list[int]]:
        """Every non-empty training sequence: users' train parts, then the train-only users."""
        return [u.train for u in self.users if u.train] + [s for s in self.train_only.values() if s]

    def item_popularity(self, num_items: int) -> list[int]:
        """Interaction counts per item over training data only (valid/test targets never leak)."""
        counts = [0] * num_items
        for seq in self.train_sequences():
            for item in seq:
                if not 0 <= item < num_items:
                    raise ValueError(f"item index {item} outside the catalogue of {num_items} items")
                counts[item] += 1
        return counts

    def stats(self) -> dict:
        train = sum(len(u.train) for u in self.users)
        n = len(self.users)
        return {
            "max_history": self.max_history,
            "eval_users": n,
            "train_only_users": len(self.train_only),
            "train_interactions": train + sum(len(s) for s in self.train_only.values()),
            "avg_train_length": round(train / n, 2) if n else 0.0,
            "avg_test_history_length": round(
                sum(len(self.history(u, "test")) for u in self.users) / n, 2) if n else 0.0,
        }

    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT_VERSION, "max_history": self.max_history,
                "users": [asdict(u) for u in self.users], "train_only": self.train_only}
        write_atomic(Path(path), json.dumps(data, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read split: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise DataError(f"{path}: not a split file of format {FORMAT_VERSION}")
        try:
            users = [UserSplit(str(u["user"]), [int(i) for i in u["train"]], int(u["valid"]),
                               int(u["test"])) for u in data["users"]]
            train_only = {str(k): [int(i) for i in v] for k, v in data.get("train_only", {}).items()}
            return cls(users, int(data["max_history"]), train_only)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed split ({type(e).__name__}: {e})") from e


def leave_one_out(dataset: Dataset, max_history: int = 20, drop_last: int = 0) -> Split:
    """Split every user of `dataset`, in the dataset's user order (deterministic, no randomness). With `drop_last`
    N (data.drop_last), each user's last N interactions are left out first: a selection split, whose test target
    is the real split's last training item and whose data never reach the real valid or test targets."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if drop_last < 0:
        raise ValueError(f"data.drop_last must be >= 0, got {drop_last}")
    users, train_only = [], {}
    for user, seq in dataset.sequences.items():
        seq = seq[:len(seq) - drop_last]
        if len(seq) >= MIN_LENGTH:
            users.append(UserSplit(user, list(seq[:-2]), seq[-2], seq[-1]))
        elif seq:
            train_only[user] = list(seq)
    if not users:
        raise DataError(f"{dataset.name}: no user has the {MIN_LENGTH} interactions a "
                        "leave-one-out split needs")
    return Split(users, max_history, train_only)


def target_item(u: UserSplit, stage: str) -> int:
    """The item `stage` asks the model to predict for user `u`."""
    stage = _check(stage)
    if stage == SELECT_STAGE:
        if len(u.train) < 2:
            raise ValueError(f"user {u.user}: the select stage needs 2 training items, the user has {len(u.train)}")
        return u.train[-1]
    return u.valid if stage == "valid" else u.test


def past_items(u: UserSplit, stage: str) -> list[int]:
    """Everything the user interacted with before `stage`'s target, oldest first."""
    stage = _check(stage)
    if stage == SELECT_STAGE:
        return u.train[:-1]
    return list(u.train) if stage == "valid" else [*u.train, u.valid]


def _check(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return stage
