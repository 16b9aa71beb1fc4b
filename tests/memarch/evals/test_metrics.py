"""Answer metrics on hand-written model outputs: BABILong label sets, RULER string_match_all, passkey."""
import pytest

from memarch.evals import metrics as m


@pytest.mark.parametrize("output,question,target,task,expected", [
    # qa1-qa4: location labels; the format answer and a bare word both count.
    ("The most recent location of Mary is kitchen.", "Where is Mary?", "kitchen", "qa1", True),
    ("kitchen", "Where is Mary?", "kitchen", "qa1", True),
    ("KITCHEN!", "Where is Mary?", "kitchen", "qa1", True),           # case-insensitive
    ("garden", "Where is Mary?", "kitchen", "qa1", False),            # wrong label
    ("kitchen or garden", "Where is Mary?", "kitchen", "qa1", False),  # two labels: |O| != 1
    ("I do not know", "Where is Mary?", "kitchen", "qa1", False),     # no label
    # Truncation at the first ".", "<context>", "<example>", "Question".
    ("kitchen. Then she went to the garden.", "Where is Mary?", "kitchen", "qa1", True),
    ("garden. kitchen", "Where is Mary?", "kitchen", "qa1", False),
    ("hallway\nQuestion: Where is John? office", "Where is Sandra?", "hallway", "qa2", True),
    ("hallway question: office", "Where is Sandra?", "hallway", "qa2", True),
    ("bedroom <context> office", "Where is the milk?", "bedroom", "qa2", True),
    ("bedroom <example> office", "Where is the milk?", "bedroom", "qa2", True),
    # Labels in the question are removed from the output's labels.
    ("The football was in the kitchen before the garden.",
     "Where was the football before the garden?", "kitchen", "qa3", True),
    ("garden", "Where was the football before the garden?", "kitchen", "qa3", False),
    ("the office", "What is the bathroom east of?", "office", "qa4", True),
    ("bathroom", "What is the bathroom east of?", "bathroom", "qa4", False),
    # qa5: actors and objects are labels.
    ("Fred gave the milk to Jeff", "Who gave the milk to Jeff?", "Fred", "qa5", True),
    ("fred", "Who gave the milk to Jeff?", "Fred", "qa5", True),
    ("Fred and Bill", "Who gave the milk to Jeff?", "Fred", "qa5", False),
    ("the apple", "What did Mary give to Bill?", "apple", "qa5", True),
    ("Mary", "What did Mary give to Bill?", "Mary", "qa5", False),    # Mary is in the question
    ("kitchen", "Where is Mary?", "kitchen", "qa5", False),           # not a qa5 label
    # Substring matching, as in BABILong: a longer word still contains the label.
    ("bedrooms", "Where is Mary?", "bedroom", "qa1", True),
])
def test_babilong_label_match(output, question, target, task, expected):
  assert m.babilong_label_match(output, question, target, task) is expected


def test_babilong_truncate_and_errors():
  assert m.babilong_truncate("Office. Kitchen") == "office"
  assert m.babilong_truncate("A<Context>B") == "a"
  assert m.babilong_truncate("no stop here") == "no stop here"
  with pytest.raises(ValueError, match="unknown BABILong task"):
    m.babilong_label_match("x", "y", "z", "qa9")


def test_string_match_all():
  golds = ["1234567", "7654321"]
  assert m.string_match_all("1234567 and 7654321", golds) == 1.0
  assert m.string_match_all("The numbers are 7654321.", golds) == 0.5
  assert m.string_match_all("nothing", golds) == 0.0
  assert m.string_match_all("the QUIET-RIVER", ["quiet-river"]) == 1.0
  assert m.string_match_all("1234567", "1234567") == 1.0
  assert m.mean_string_match_all(["1234567 7654321", "7654321", ""], [golds] * 3) == pytest.approx(50.0)
  with pytest.raises(ValueError):
    m.string_match_all("x", [])


def test_passkey_match():
  assert m.passkey_match(" 12345. Remember it.", 12345)
  assert m.passkey_match("The pass key is 12345", "12345")
  assert not m.passkey_match("123456", 12345)
  assert not m.passkey_match("3 times, 12345", 12345)       # only the first integer counts
  assert not m.passkey_match("I forgot", 12345)
  assert m.passkey_match("007", 7)
