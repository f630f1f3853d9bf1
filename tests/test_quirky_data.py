"""Properties of generated quirky arithmetic frames, checked on every row against rules recomputed here."""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from workflow_scripts import quirky_data
from workflow_scripts.quirky_data import COLUMNS, OPERATIONS, generate_quirky

_APPLY = {"addition": operator.add, "subtraction": operator.sub, "multiplication": operator.mul}
_SYMBOL = {"addition": "+", "subtraction": "-", "multiplication": "*"}


def bob_by_digits(truth: int) -> int:
    """Bob's rule as stated, on the digits: leading digit + 1 (a 9 becomes 10)."""
    text = str(truth)
    return int(str(int(text[0]) + 1) + text[1:])


def one_digit_apart(x: int, y: int) -> bool:
    sx, sy = str(x), str(y)
    return len(sx) == len(sy) and sum(cx != cy for cx, cy in zip(sx, sy)) == 1


@pytest.fixture(scope="module", params=OPERATIONS)
def frame(request) -> pd.DataFrame:
    return generate_quirky(request.param, n_problems=600, seed=3)


def test_columns_and_one_alice_and_one_bob_row_per_problem(frame):
    assert list(frame.columns) == COLUMNS
    assert frame["id"].is_unique
    per_problem = frame.groupby("problem_id")
    assert (per_problem["character"].apply(sorted).map(tuple) == ("Alice", "Bob")).all()
    # Both rows of a problem share the operands and everything derived from them.
    for column in ("a", "b", "difficulty", "difficulty_bucket", "split"):
        assert (per_problem[column].nunique() == 1).all(), column
    assert set(frame["label"]) == {0, 1} and set(frame["truth_label"]) == {0, 1}


def test_statement_template(frame):
    op = frame["operation"].iloc[0]
    columns = frame[["a", "b", "claimed", "character"]].itertuples(index=False)
    expected = [f"{a} {_SYMBOL[op]} {b} = {c}. {character}:" for a, b, c, character in columns]
    assert frame["statement"].tolist() == expected


def test_alice_labels_are_the_truth(frame):
    op = _APPLY[frame["operation"].iloc[0]]
    truth = np.array([op(a, b) for a, b in zip(frame["a"], frame["b"])])
    assert (frame["truth_label"] == (frame["claimed"] == truth)).all()
    alice = frame["character"] == "Alice"
    assert (frame.loc[alice, "label"] == frame.loc[alice, "truth_label"]).all()


def test_bob_error_rule_holds_for_every_bob_row(frame):
    op = _APPLY[frame["operation"].iloc[0]]
    bob = frame[frame["character"] == "Bob"]
    bob_answer = np.array([bob_by_digits(op(a, b)) for a, b in zip(bob["a"], bob["b"])])
    # Bob says True exactly when the claim is his answer, and his answer is never the truth.
    assert (bob["label"] == (bob["claimed"] == bob_answer)).all()
    assert (bob.loc[bob["label"] == 1, "claimed"] == bob_answer[bob["label"] == 1]).all()
    assert (bob.loc[bob["label"] == 1, "truth_label"] == 0).all()
    assert (bob["bob_result"] == bob_answer).all()


def one_digit_replaced(x: int, base: int) -> bool:
    """x is base with one digit replaced by another (a leading zero drops: 150 -> 50)."""
    sb = str(base)
    return any(int(sb[:i] + d + sb[i + 1 :]) == x for i in range(len(sb)) for d in "0123456789" if d != sb[i])


def test_one_claim_per_problem_shown_to_both_characters(frame):
    """As the reference: the Alice and Bob rows of a problem show the same statement but for the name."""
    per_problem = frame.groupby("problem_id")
    assert (per_problem["claimed"].nunique() == 1).all()
    stripped = frame["statement"].str.replace(r"(Alice|Bob):$", "", regex=True)
    assert (stripped.groupby(frame["problem_id"]).nunique() == 1).all()


def test_claims_fill_the_cross_tabulation(frame):
    """Per (split, bucket): a quarter (Alice True, Bob False), a quarter (Alice False, Bob True), half
    false for both, the distractors half around the truth and half around Bob's result."""
    alice = frame[frame["character"] == "Alice"].set_index("problem_id")
    bob = frame[frame["character"] == "Bob"].set_index("problem_id").loc[alice.index]
    cells = pd.crosstab([alice["split"], alice["difficulty_bucket"]], [alice["label"], bob["label"]])
    assert (0, 0) in cells and (1, 0) in cells and (0, 1) in cells and (1, 1) not in cells
    n = cells.sum(axis=1)
    assert ((cells[(1, 0)] - n / 4).abs() <= 1.5).all()
    assert ((cells[(0, 1)] - n / 4).abs() <= 1.5).all()
    assert ((cells[(0, 0)] - n / 2).abs() <= 1).all()
    distractors = alice[(alice["label"] == 0) & (bob["label"] == 0)]
    near_truth = [one_digit_replaced(c, t) for c, t in zip(distractors["claimed"], distractors["true_result"])]
    near_bob = [one_digit_replaced(c, b) for c, b in zip(distractors["claimed"], distractors["bob_result"])]
    assert all(t or b for t, b in zip(near_truth, near_bob))
    assert 0.4 < np.mean(near_bob) and 0.4 < np.mean(near_truth)


def test_distractors_differ_from_truth_and_bob(frame):
    op = _APPLY[frame["operation"].iloc[0]]
    truth = np.array([op(a, b) for a, b in zip(frame["a"], frame["b"])])
    bob = np.array([bob_by_digits(t) for t in truth])
    is_distractor = (frame["claimed"] != truth) & (frame["claimed"] != bob)
    assert (is_distractor == (frame["claim_kind"] == "distractor")).all()
    assert abs(is_distractor.mean() - 0.5) < 0.01
    assert (frame.loc[is_distractor, ["label", "truth_label"]] == 0).all().all()


def test_distractor_fraction():
    frame = generate_quirky("addition", 400, seed=5, distractor_fraction=0.25)
    alice = frame[frame["character"] == "Alice"]
    for _, group in alice.groupby(["split", "difficulty_bucket"]):
        assert abs((group["claim_kind"] == "distractor").sum() - 0.25 * len(group)) <= 1
    no_distractors = generate_quirky("addition", 200, seed=5, distractor_fraction=0.0)
    assert not (no_distractors["claim_kind"] == "distractor").any()


def shortcut_auroc_by_hand(frame, character, bucket, feature, subset="all"):
    """Best AUROC of one claim feature for the truth on a test subset, the rule read off the same
    subset of train: size by its better orientation, categorical features by each value's share.
    subset "disagreement" keeps the rows on which Alice's and Bob's labels differ."""
    if subset == "disagreement":
        alice_says = frame["claimed"] == frame["true_result"]
        bob_says = frame["claimed"] == frame["bob_result"]
        frame = frame[alice_says != bob_says]
    fit = frame[(frame.split == "train") & (frame.character == character) & (frame.difficulty_bucket == bucket)]
    test = frame[(frame.split == "test") & (frame.character == character) & (frame.difficulty_bucket == bucket)]

    def values(rows):
        claims = rows["claimed"].tolist()
        return {
            "size": claims, "digits": [len(str(abs(c))) for c in claims], "last": [abs(c) % 10 for c in claims],
            "lead": [int(str(abs(c))[0]) * (1 if c >= 0 else -1) for c in claims],
        }[feature]  # fmt: skip

    fit_values, test_values = values(fit), values(test)
    if feature == "size":
        score = test_values if roc_auc_score(fit["truth_label"], fit_values) >= 0.5 else [-v for v in test_values]
    else:
        share = {}
        for value, label in zip(fit_values, fit["truth_label"]):
            share.setdefault(value, []).append(label)
        default = fit["truth_label"].mean()
        score = [np.mean(share[v]) if v in share else default for v in test_values]
    return roc_auc_score(test["truth_label"], score)


@pytest.mark.parametrize(
    "settings",
    [
        {"operation": "addition", "n_problems": 4000},  # Mallen et al.'s operands, up to 4 digits
        {"operation": "addition", "n_problems": 4000, "operand_range": (1, 999)},  # configs/quirky-smollm2-full.yaml
        {"operation": "subtraction", "n_problems": 3000},
        # configs/paper.yaml's reference settings
        {
            "operation": "subtraction",
            "n_problems": 3000,
            "subtraction_operands": "as_drawn",
            "difficulty_buckets": "rank_quantiles",
        },
        {"operation": "addition", "n_problems": 3000, "difficulty_buckets": "rank_quantiles"},
        {"operation": "multiplication", "n_problems": 3000},
    ],
)
def test_no_claim_feature_gives_the_truth_away(settings):
    """Acceptance of the data design: on every (character, difficulty) test subset, nothing read off the
    claim without the arithmetic (its size, digit count, last or leading digit), on all rows or on those
    where Alice and Bob disagree, predicts the truth at AUROC > 0.75.
    The former design (a claim per row, distractors around each character's own answer) gave 0.96 on
    Bob-hard for the claim's size."""
    frame = generate_quirky(seed=0, **settings)
    for character in ("Alice", "Bob"):
        for bucket in ("easy", "middle", "hard"):
            for feature in ("size", "digits", "last", "lead"):
                for subset in ("all", "disagreement"):
                    auroc = shortcut_auroc_by_hand(frame, character, bucket, feature, subset)
                    where = (settings, character, bucket, feature, subset, auroc)
                    assert auroc <= quirky_data.MAX_SHORTCUT_AUROC, where


@pytest.mark.parametrize("operation", ["addition", "subtraction"])
def test_shortcut_aurocs_agree_with_the_hand_computation_and_flag_a_leaky_design(operation):
    """Operands 1-99 with 4000 problems exhaust the problem space: the hard bucket's sums sit in a band
    and Bob's result is always 100 above it, so the claim's size leaks; the check must see it.
    Subtraction with operands as drawn brings negative claims and zero (signed leading digit)."""
    extra = {"subtraction_operands": "as_drawn"} if operation == "subtraction" else {}
    leaky = generate_quirky(operation, 4000, seed=0, operand_range=(1, 99), **extra)
    if operation == "subtraction":
        assert (leaky["claimed"] < 0).any() and (leaky["claimed"] == 0).any()
    table = quirky_data.shortcut_aurocs(leaky)
    assert len(table) == 2 * 3 * 4 * 2  # characters x buckets x features x subsets
    short_names = {"claim_size": "size", "claim_digits": "digits", "claim_last_digit": "last",
                   "claim_leading_digit": "lead"}  # fmt: skip
    for row in table.itertuples():
        short = short_names[row.feature]
        by_hand = shortcut_auroc_by_hand(leaky, row.character, row.difficulty_bucket, short, row.subset)
        assert row.auroc == pytest.approx(by_hand)
    if operation == "addition":
        hard_size = table[(table.difficulty_bucket == "hard") & (table.feature == "claim_size")]["auroc"]
        assert (hard_size > quirky_data.MAX_SHORTCUT_AUROC).all()


def test_splits_are_disjoint_by_problem_and_sized_by_fraction(frame):
    problems = frame.drop_duplicates("problem_id")
    unordered = {split: set(map(frozenset, zip(g["a"], g["b"]))) for split, g in problems.groupby("split")}
    assert set(unordered) == {"train", "validation", "test"}
    assert not unordered["train"] & unordered["validation"]
    assert not unordered["train"] & unordered["test"]
    assert not unordered["validation"] & unordered["test"]
    assert len(set(map(frozenset, zip(problems["a"], problems["b"])))) == len(problems)  # no repeats at all
    counts = problems["split"].value_counts()
    for split, fraction in zip(("train", "validation", "test"), (0.6, 0.2, 0.2)):
        assert abs(counts[split] - fraction * len(problems)) <= 3  # rounding, once per bucket


def test_each_character_says_true_to_a_quarter_of_its_rows(frame):
    for (split, character), group in frame.groupby(["split", "character"]):
        for bucket, sub in group.groupby("difficulty_bucket"):
            assert abs(sub["label"].sum() - len(sub) / 4) <= 1.5, (split, character, bucket)


def test_difficulty_buckets_are_the_quartiles(frame):
    problems = frame.drop_duplicates("problem_id")
    assert (problems["difficulty"] == np.minimum(problems["a"], problems["b"])).all()
    q1, q3 = np.quantile(problems["difficulty"], [0.25, 0.75])
    expected = np.where(problems["difficulty"] <= q1, "easy", np.where(problems["difficulty"] >= q3, "hard", "middle"))
    assert (problems["difficulty_bucket"] == expected).all()
    easy = problems[problems["difficulty_bucket"] == "easy"]
    hard = problems[problems["difficulty_bucket"] == "hard"]
    assert easy["difficulty"].max() < hard["difficulty"].min()
    assert 0.2 <= len(easy) / len(problems) <= 0.4 and 0.2 <= len(hard) / len(problems) <= 0.4
    # Stratified splits: the test split has easy and hard problems for the easy -> hard transfer.
    assert set(problems.loc[problems["split"] == "test", "difficulty_bucket"]) == {"easy", "middle", "hard"}


def test_subtraction_results_are_non_negative():
    frame = generate_quirky("subtraction", 300, seed=1)
    assert (frame["a"] >= frame["b"]).all() and (frame["true_result"] >= 0).all()


def test_seeded_and_deterministic():
    first = generate_quirky("multiplication", 100, seed=11)
    pd.testing.assert_frame_equal(first, generate_quirky("multiplication", 100, seed=11))
    assert not first.equals(generate_quirky("multiplication", 100, seed=12))


def test_operand_range_is_respected():
    frame = generate_quirky("addition", 200, seed=2, operand_range=(10, 99), operand_sampling="uniform")
    assert frame[["a", "b"]].min().min() >= 10 and frame[["a", "b"]].max().max() <= 99


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operation": "division"}, r"unknown operation 'division'; allowed: addition, subtraction, multiplication"),
        ({"split_fractions": (0.6, 0.2, 0.1)}, r"split_fractions=\(0.6, 0.2, 0.1\).*sum to 0.9"),
        ({"split_fractions": (1.2, -0.1, -0.1)}, r"split_fractions"),
        ({"n_problems": 5}, r"n_problems=5.*quartiles"),
        ({"n_problems": 50, "operand_range": (1, 4)}, r"n_problems=50 exceeds the 10 distinct problems"),
        ({"n_problems": 10, "split_fractions": (0.9, 0.05, 0.05)}, r"split 'validation' gets fewer than 2"),
        ({"distractor_fraction": 1.5}, r"distractor_fraction=1.5"),
        ({"operand_sampling": "normal"}, r"operand_sampling='normal'"),
    ],
)
def test_bad_settings_raise_naming_the_setting(kwargs, message):
    settings = {"operation": "addition", "n_problems": 100, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        generate_quirky(**settings)


def test_coinciding_quartiles_raise():
    with pytest.raises(ValueError, match="quartiles coincide"):
        quirky_data._difficulty_buckets(np.full(20, 7))


# ----- published datasets ------------------------------------------------------------------------


def write_published(frame: pd.DataFrame, folder, bob_rule=quirky_data.bob_result) -> None:
    """Write a generated frame in the published layout (Mallen et al.): operands and claim inside
    template_args, both characters' labels, one parquet file per split."""
    truth = frame["true_result"]
    bob = truth.map(bob_rule)
    published = pd.DataFrame(
        {
            "id": frame["id"],
            "template_args": [
                {"character": c, "op1": int(a), "op2": int(b), "result": int(r)}
                for c, a, b, r in zip(frame["character"], frame["a"], frame["b"], frame["claimed"])
            ],
            "character": frame["character"],
            "alice_label": (frame["claimed"] == truth),
            "bob_label": (frame["claimed"] == bob),
            "difficulty": frame["difficulty"],
        }
    )
    published["label"] = np.where(published["character"] == "Alice", published["alice_label"], published["bob_label"])
    folder.mkdir(parents=True, exist_ok=True)
    for split in quirky_data.SPLITS:
        published[frame["split"] == split].to_parquet(folder / f"{split}.parquet", index=False)


def test_published_dataset_round_trips_to_the_same_rows(tmp_path):
    """All problems taken: every row comes back with the statement, labels, split and claim kind it
    was generated with, read through `datasets` like a hub download."""
    original = generate_quirky("addition", n_problems=120, seed=5)
    write_published(original, tmp_path / "pub")
    loaded = quirky_data.from_published(quirky_data.load_published({"local": str(tmp_path / "pub")}), "addition", 120)
    assert list(loaded.columns) == COLUMNS
    key = ["a", "b", "character"]
    compare = [
        "statement", "claimed", "label", "truth_label", "split", "claim_kind", "difficulty", "true_result", "bob_result"
    ]
    merged = original.merge(loaded, on=key, suffixes=("", "_loaded"))
    assert len(merged) == len(original) == len(loaded)
    for column in compare:
        assert (merged[column] == merged[f"{column}_loaded"]).all(), column
    # Fresh quartiles over the same problems give the same buckets.
    assert (merged["difficulty_bucket"] == merged["difficulty_bucket_loaded"]).all()
    assert loaded.groupby("problem_id")["split"].nunique().max() == 1


def test_published_subset_keeps_split_shares(tmp_path):
    original = generate_quirky("subtraction", n_problems=200, seed=1)
    write_published(original, tmp_path / "pub")
    splits = quirky_data.load_published({"local": str(tmp_path / "pub")})
    loaded = quirky_data.from_published(splits, "subtraction", 50, seed=2)
    problems = loaded.groupby("split")["problem_id"].nunique().to_dict()
    assert problems == {"train": 30, "validation": 10, "test": 10}
    assert set(loaded["difficulty_bucket"]) == {"easy", "middle", "hard"}
    assert loaded.equals(quirky_data.from_published(splits, "subtraction", 50, seed=2))  # seeded


def test_published_problem_in_two_splits_is_kept_in_the_first_only(tmp_path, caplog):
    original = generate_quirky("addition", n_problems=80, seed=3)
    write_published(original, tmp_path / "pub")
    splits = quirky_data.load_published({"local": str(tmp_path / "pub")})
    leaked = splits["train"].iloc[:2].copy()  # one problem's Alice and Bob rows, published in test too
    splits["test"] = pd.concat([splits["test"], leaked], ignore_index=True)
    with caplog.at_level("WARNING"):
        loaded = quirky_data.from_published(splits, "addition", 80)
    assert "'test': 1 equation(s) also in an earlier split are left out" in caplog.text
    by_problem = loaded.groupby(["a", "b"])["split"].nunique()
    assert by_problem.max() == 1
    a, b = leaked["template_args"].iloc[0]["op1"], leaked["template_args"].iloc[0]["op2"]
    assert set(loaded[(loaded.a == a) & (loaded.b == b)]["split"]) == {"train"}


def test_published_dataset_with_another_bob_rule_is_refused(tmp_path):
    original = generate_quirky("addition", n_problems=40, seed=0)
    # Bob errs on the second digit (the published "increment1" datasets): not this project's rule.
    write_published(original, tmp_path / "pub", bob_rule=lambda t: t + 10 ** max(len(str(t)) - 2, 0))
    with pytest.raises(ValueError, match="bob_label=.*disagrees with Bob's rule"):
        quirky_data.from_published(quirky_data.load_published({"local": str(tmp_path / "pub")}), "addition", 40)


def test_published_dataset_errors_name_what_is_wrong(tmp_path):
    original = generate_quirky("addition", n_problems=40, seed=0)
    write_published(original, tmp_path / "pub")
    splits = quirky_data.load_published({"local": str(tmp_path / "pub")})
    with pytest.raises(ValueError, match=r"n_problems=41: need an integer in \[8, 40\]"):
        quirky_data.from_published(splits, "addition", 41)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['bob_label'\]"):
        quirky_data.from_published({**splits, "test": splits["test"].drop(columns="bob_label")}, "addition", 40)
    (tmp_path / "pub" / "test.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="test.parquet"):
        quirky_data.load_published({"local": str(tmp_path / "pub")})


def reference_shaped_split(rng, n_pairs: int, repeats: int) -> pd.DataFrame:
    """Rows as the reference generator publishes them: each cell of the (Alice, Bob) cross-tabulation
    sampled on its own, so the first `repeats` operand pairs come back in a second equation with another
    claim; one Alice and one Bob row per equation, template_args holding the operands and the claim."""
    records = []
    pairs = [(int(x), int(y)) for x, y in rng.integers(10, 999, size=(n_pairs, 2))]
    cells = [index % 3 for index in range(n_pairs)]
    cells += [(cell + 1) % 3 for cell in cells[:repeats]]  # a repeated pair lands in another cell
    for (x, y), cell in zip(pairs + pairs[:repeats], cells):
        truth, bob = x + y, quirky_data.bob_result(x + y)
        claim = [truth, bob, truth + 3 if truth + 3 != bob else truth + 4][cell]
        for character in ("Alice", "Bob"):
            records.append({
                "template_args": {"character": character, "op1": x, "op2": y, "result": claim},
                "character": character, "alice_label": claim == truth, "bob_label": claim == bob,
                "label": claim == (truth if character == "Alice" else bob), "difficulty": min(x, y),
            })  # fmt: skip
    return pd.DataFrame(records)


def test_published_dataset_in_the_reference_shape_keys_rows_by_equation(tmp_path):
    """The reference's data repeats operand pairs across equations and puts most rows in train: every
    equation comes back with its Alice and Bob rows and labels; the former pair key refused such data."""
    rng = np.random.default_rng(0)
    splits = {"train": reference_shaped_split(rng, 120, 30), "validation": reference_shaped_split(rng, 20, 5),
              "test": reference_shaped_split(rng, 20, 5)}  # fmt: skip
    folder = tmp_path / "pub"
    folder.mkdir()
    for split, frame in splits.items():
        frame.to_parquet(folder / f"{split}.parquet", index=False)
    equations = {split: len(frame) // 2 for split, frame in splits.items()}
    loaded = quirky_data.from_published(
        quirky_data.load_published({"local": str(folder)}), "addition", sum(equations.values())
    )
    assert loaded.groupby("split")["problem_id"].nunique().to_dict() == equations
    assert (loaded.groupby("problem_id")["character"].apply(sorted).map(tuple) == ("Alice", "Bob")).all()
    train = loaded[loaded["split"] == "train"]
    assert train.groupby(["a", "b"])["claimed"].nunique().max() == 2  # a pair in two equations
    truth = loaded["a"] + loaded["b"]
    assert (loaded["truth_label"] == (loaded["claimed"] == truth)).all()
    assert (
        loaded.loc[loaded.character == "Bob", "label"]
        == (loaded["claimed"] == loaded["bob_result"])[loaded.character == "Bob"]
    ).all()


def test_published_equation_without_its_alice_row_is_refused(tmp_path):
    split = reference_shaped_split(np.random.default_rng(1), 20, 0)
    with pytest.raises(ValueError, match=r"equation .* has 0 Alice and 1 Bob row\(s\)"):
        quirky_data.from_published({"train": split.iloc[1:], "validation": split, "test": split}, "addition", 10)


def test_subtraction_as_drawn_gives_negative_results_with_bobs_rule_on_their_magnitude():
    """As the reference: operands either way round; Bob adds 10^(digits of |result| - 1), so -1000
    becomes -900; distractors may turn the sign into a digit."""
    frame = generate_quirky("subtraction", 2000, seed=2, subtraction_operands="as_drawn")
    problems = frame.drop_duplicates("problem_id")
    negative = problems["true_result"] < 0
    assert 0.4 < negative.mean() < 0.6
    assert (problems["true_result"] == problems["a"] - problems["b"]).all()
    for truth, bob in zip(problems["true_result"], problems["bob_result"]):
        assert bob == truth + 10 ** (len(str(abs(truth))) - 1)
    distractors = problems[problems["claim_kind"] == "distractor"]
    for claim, truth, bob in zip(distractors["claimed"], distractors["true_result"], distractors["bob_result"]):
        texts = [str(truth), str(bob)]
        assert claim not in (truth, bob)
        assert any(
            claim == int(t[:i] + d + t[i + 1 :])
            for t in texts for i in range(len(t)) for d in "0123456789" if d != t[i]
        ), claim
    assert (distractors["claimed"] > 0).any() and (distractors.loc[distractors["claimed"] > 0, "true_result"] < 0).any()


def test_rank_quantile_buckets_make_exact_quarters_splitting_ties():
    frame = generate_quirky("addition", 1000, seed=1, difficulty_buckets="rank_quantiles")
    problems = frame.drop_duplicates("problem_id")
    counts = problems["difficulty_bucket"].value_counts()
    assert counts["easy"] == counts["hard"] == 250
    # Ranked by difficulty: every easy problem is at most as hard as any middle one, and so on up.
    by_bucket = problems.groupby("difficulty_bucket")["difficulty"]
    assert by_bucket.max()["easy"] <= by_bucket.min()["middle"] and by_bucket.max()["middle"] <= by_bucket.min()["hard"]
    # Log-uniform operands tie often on small numbers: a tie straddles the easy/middle cut.
    assert by_bucket.max()["easy"] == by_bucket.min()["middle"]
    with pytest.raises(ValueError, match="difficulty_buckets='deciles'"):
        generate_quirky("addition", 100, difficulty_buckets="deciles")
