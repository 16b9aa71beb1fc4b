"""BABILong-style data: procedural bAbI qa1-qa5 stories hidden in procedural background text.

Follows BABILong (Kuratov et al., NeurIPS 2024 D&B, arXiv:2406.10149) sample construction and the bAbI
world rules (Weston et al. 2015, arXiv:1502.05698; facebookarchive/bAbI-tasks). Results on this data
are "BABILong-style qaN (memarch generator, procedural noise, byte tokenizer) at length X", never the
official benchmark: the facts, the noise and the tokenizer all differ.

Construction of example (task, length, index):

1. A story is simulated from `np.random.default_rng([seed, split, task_id, index])`: a hidden world
   (actors, objects, locations; initial positions random and never stated) and a stream of actions, each
   stated by one sentence. Reader knowledge is tracked separately and a question is asked only when the
   statements so far answer it (the rules per task are in the `_story_qaN` docstrings).
2. One question of the story is chosen uniformly among those whose facts fit the budget; the facts are
   every statement before it (earlier questions dropped, BABILong step 1). BABILong drops samples with
   more than length/8 facts (GPT-2 tokens); we instead require the joined facts to fit in `length`
   tokens, and resimulate when no question fits [ours].
3. Noise: procedural English-like sentences from the word lists below [ours], drawn from
   a second generator `[seed, split, task_id, index, 1]`, so a story's filler does not depend on
   how many stories were rejected. No filler word contains an actor, object, location or direction
   name (BABILong's PG19 noise is not filtered; this is a deviation that makes facts easier to spot).
   Sentences are appended until the budget is met; the last one is cut to fit (BABILong step 2).
4. Insertion (BABILong step 4): with M noise sentences, every fact draws a slot in {0..M} uniformly
   with replacement, slots are sorted, and fact j goes before noise sentence slot_j (M = end); ties keep
   story order, so facts stay in order. Pieces are joined by single spaces.

Length: `length` is the number of context tokens in `tokenizer` (byte-level by default); the question is
not part of the context (step 5). With the byte tokenizer the context has exactly `length` tokens
whenever the facts leave room for noise (`length` > facts + 1); otherwise (and for `length=0`) the
context is the facts alone. For other tokenizers token counts are not additive: the noise budget is
corrected up to four times and the result lies within `length_tolerance(length)` tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from memarch.data import row_range
from memarch.data.text import prompt_answer_row
from memarch.data.tokenizer import ByteTokenizer, num_tokens

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
_TASK_ID = {t: i + 1 for i, t in enumerate(TASKS)}

LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
ACTORS = ("John", "Mary", "Sandra", "Daniel")          # qa1-qa3
ACTORS_QA5 = ("Bill", "Fred", "Jeff", "Mary")
DIRECTIONS = ("north", "south", "east", "west")
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

LABELS = {
    "qa1": list(LOCATIONS), "qa2": list(LOCATIONS), "qa3": list(LOCATIONS), "qa4": list(LOCATIONS),
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
}

MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GET_VERBS = ("picked up", "grabbed", "took", "got")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "handed", "passed")

QUESTIONS_PER_STORY = 5
MAX_STATEMENTS = 200      # a stream story that has not asked its questions by then is resimulated
MAX_TRIES = 200

# ---------------------------------------------------------------------------------------------------
# Procedural background text. Words are ours; none contains an entity name (checked in the tests).

NOUNS = (
    "river", "stone", "lantern", "meadow", "window", "cloud", "harbor", "candle", "village", "tower",
    "bridge", "letter", "forest", "shadow", "winter", "summer", "market", "wagon", "mirror", "engine",
    "painter", "sailor", "farmer", "teacher", "doctor", "child", "stranger", "merchant", "soldier",
    "widow", "traveler", "captain", "cottage", "valley", "island", "orchard", "chimney", "blanket",
    "basket", "ribbon", "feather", "compass", "ladder", "kettle", "violin", "song", "rumor", "storm",
    "morning", "evening", "question", "promise", "journey", "custom", "council", "castle", "road",
    "garment", "parcel", "mill", "bell", "lamp", "coin", "horse", "dog", "cat", "crow", "fox", "owl",
)
ADJECTIVES = (
    "old", "quiet", "bright", "narrow", "heavy", "pale", "golden", "broken", "distant", "gentle",
    "silent", "crooked", "tired", "curious", "patient", "ancient", "hollow", "early", "late", "warm",
    "cold", "young", "proud", "humble", "strange", "simple", "careful", "lonely", "busy", "dusty",
    "shallow", "steady", "little", "famous", "wooden", "silver", "bitter", "sudden", "faint", "rough",
)
_TRANSITIVE = (
    "watched", "carried", "followed", "praised", "painted", "repaired", "noticed", "remembered",
    "visited", "opened", "closed", "admired", "described", "measured", "borrowed", "mended", "sold",
    "bought", "heard", "found", "touched", "guarded", "crossed", "studied", "greeted", "answered",
    "covered", "pulled", "pushed", "lifted", "counted", "cleaned", "ignored", "feared", "wanted",
)
_INTRANSITIVE = (
    "waited", "laughed", "slept", "sang", "listened", "trembled", "smiled", "rested", "wandered",
    "paused", "shone", "faded", "lingered", "whispered", "stayed", "returned", "hesitated", "glowed",
    "settled", "wept",
)
_ADVERBS = (
    "slowly", "quietly", "often", "rarely", "gladly", "suddenly", "patiently", "carefully", "gently",
    "softly", "briefly", "again", "together", "alone", "happily", "calmly", "nearly", "always",
)
_PREPOSITIONS = ("near", "behind", "beside", "beyond", "under", "above", "across", "along", "inside",
                 "around", "through", "toward")
_DETERMINERS = ("The", "A", "Every", "One", "That", "Some")

FILLER_WORDS = tuple(sorted(set(NOUNS + ADJECTIVES + _TRANSITIVE + _INTRANSITIVE + _ADVERBS
                                + _PREPOSITIONS + tuple(d.lower() for d in _DETERMINERS)
                                + ("it", "of", "and", "when", "there", "was", "the", "a", "an"))))


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
  return words[int(rng.integers(len(words)))]


def filler_sentence(rng: np.random.Generator) -> str:
  """One procedural background sentence (a tiny grammar over the word lists above)."""
  def n(): return _pick(rng, NOUNS)
  def a(): return _pick(rng, ADJECTIVES)
  def vt(): return _pick(rng, _TRANSITIVE)
  def vi(): return _pick(rng, _INTRANSITIVE)
  def adv(): return _pick(rng, _ADVERBS)
  def prep(): return _pick(rng, _PREPOSITIONS)

  def a_(word): return ("an " if word[0] in "aeiou" else "a ") + word

  form = int(rng.integers(7))
  if form == 0:
    s = f"the {a()} {n()} {vt()} the {n()} {prep()} the {n()}"
  elif form == 1:
    det = _pick(rng, _DETERMINERS).lower()
    adj = a()
    s = f"{a_(adj) if det == 'a' else det + ' ' + adj} {n()} {vi()} {adv()} {prep()} the {n()}"
  elif form == 2:
    s = f"{adv()}, the {n()} {vt()} {a_(a())} {n()} and {vi()}"
  elif form == 3:
    s = f"the {n()} of the {a()} {n()} {vi()} {prep()} the {a()} {n()}"
  elif form == 4:
    s = f"it {vi()} {adv()} when the {n()} {vt()} the {a()} {n()}"
  elif form == 5:
    s = f"there was {a_(a())} {n()} {prep()} the {n()}, and it {vi()} {adv()}"
  else:
    s = f"the {n()} {vt()} the {a()} {n()} {adv()}, and the {n()} {vi()}"
  return s[0].upper() + s[1:] + "."


# ---------------------------------------------------------------------------------------------------
# The world and the reader's knowledge.


@dataclasses.dataclass
class _Question:
  num_facts: int          # statements before the question
  question: str
  answer: str
  supporting: tuple       # indices into the statements


class _World:
  """Hidden state plus what a reader of the statements so far can derive.

  Reader rules: a move states the actor's location; get/give state who holds the object; a drop leaves
  the object at the dropper's known location (unknown if that was never stated). A held object is where
  its holder was last stated to be. No co-location inference (e.g. from "picked up ... there") is used
  [ours]: it only ever withholds questions, never changes an answer, because the world cannot change a
  location without stating a move.
  """

  def __init__(self, rng: np.random.Generator, actors: Sequence[str], kinds: Sequence[str]):
    self.rng, self.actors, self.kinds = rng, tuple(actors), tuple(kinds)
    self.loc = {a: _pick(rng, LOCATIONS) for a in self.actors}
    self.holder = {o: None for o in OBJECTS}
    self.obj_loc = {o: _pick(rng, LOCATIONS) for o in OBJECTS}
    self.known_loc = {a: None for a in self.actors}        # actor -> (location, statement index)
    self.known_obj = {o: None for o in OBJECTS}            # ("held", actor, idx) | ("at", loc, support)
    self.history = {o: [] for o in OBJECTS}                # [(location, support)], consecutive distinct
    self.statements: list[str] = []
    self.last_give = None                                  # (giver, object, receiver, idx)

  # -- reader knowledge
  def object_location(self, o):
    k = self.known_obj[o]
    if k is None:
      return None, ()
    if k[0] == "at":
      return k[1], k[2]
    holder_loc = self.known_loc[k[1]]
    if holder_loc is None:
      return None, ()
    return holder_loc[0], tuple(sorted({k[2], holder_loc[1]}))

  def _update_history(self):
    for o in OBJECTS:
      loc, support = self.object_location(o)
      if loc is not None and (not self.history[o] or self.history[o][-1][0] != loc):
        self.history[o].append((loc, support))

  # -- actions
  def _instances(self, kind):
    if kind == "move":
      return [(a, l) for a in self.actors for l in LOCATIONS if l != self.loc[a]]
    if kind == "get":
      return [(a, o) for a in self.actors for o in OBJECTS
              if self.holder[o] is None and self.obj_loc[o] == self.loc[a]]
    if kind == "drop":
      return [(a, o) for a in self.actors for o in OBJECTS if self.holder[o] == a]
    if kind == "give":
      return [(a, o, b) for a in self.actors for o in OBJECTS for b in self.actors
              if self.holder[o] == a and b != a and self.loc[b] == self.loc[a]]
    raise ValueError(kind)

  def step(self) -> str:
    """Pick an action type uniformly among those with a valid instance, then a uniform instance."""
    options = [(k, inst) for k in self.kinds if (inst := self._instances(k))]
    kind, instances = options[int(self.rng.integers(len(options)))]
    args = instances[int(self.rng.integers(len(instances)))]
    idx = len(self.statements)
    rng = self.rng
    if kind == "move":
      a, l = args
      self.loc[a] = l
      self.known_loc[a] = (l, idx)
      s = f"{a} {_pick(rng, MOVE_VERBS)} the {l}."
    elif kind == "get":
      a, o = args
      self.holder[o] = a
      self.known_obj[o] = ("held", a, idx)
      s = f"{a} {_pick(rng, GET_VERBS)} the {o}{' there' if rng.integers(2) else ''}."
    elif kind == "drop":
      a, o = args
      self.holder[o], self.obj_loc[o] = None, self.loc[a]
      here = self.known_loc[a]
      self.known_obj[o] = ("at", here[0], tuple(sorted({idx, here[1]}))) if here else ("at", None, ())
      s = f"{a} {_pick(rng, DROP_VERBS)} the {o}."
    else:
      a, o, b = args
      self.holder[o] = b
      self.known_obj[o] = ("held", b, idx)
      self.last_give = (a, o, b, idx)
      s = f"{a} {_pick(rng, GIVE_VERBS)} the {o} to {b}."
    self.statements.append(s)
    self._update_history()
    return kind


def _story_qa1(rng):
  """qa1, single supporting fact: (move, move, question) x 5; "Where is A?" for an actor with a stated
  location, answer its last stated location."""
  w = _World(rng, ACTORS, ("move",))
  questions = []
  for _ in range(QUESTIONS_PER_STORY):
    w.step(), w.step()
    known = [a for a in ACTORS if w.known_loc[a] is not None]
    a = _pick(rng, known)
    questions.append(_Question(len(w.statements), f"Where is {a}?", w.known_loc[a][0],
                               (w.known_loc[a][1],)))
  return w.statements, questions


def _stream_story(rng, kinds, ask: Callable, actors=ACTORS):
  w = _World(rng, actors, kinds)
  questions, since = [], 0
  while len(questions) < QUESTIONS_PER_STORY and len(w.statements) < MAX_STATEMENTS:
    kind = w.step()
    since += 1
    q = ask(w, kind, since)
    if q is not None:
      questions.append(q)
      since = 0
  return w.statements, questions


def _story_qa2(rng):
  """qa2, two supporting facts: get/drop/move stream; once >= 3 statements follow the last question,
  with probability 1/2 ask "Where is the o?" for an object whose location is derivable (held: holder's
  last stated location; dropped: the holder's location at the drop)."""
  def ask(w, kind, since):
    if since < 3 or w.rng.random() >= 0.5:
      return None
    known = [o for o in OBJECTS if w.object_location(o)[0] is not None]
    if not known:
      return None
    o = _pick(w.rng, known)
    loc, support = w.object_location(o)
    return _Question(len(w.statements), f"Where is the {o}?", loc, support)
  return _stream_story(rng, ("move", "get", "drop"), ask)


def _story_qa3(rng):
  """qa3, three supporting facts: the qa2 stream; "Where was the o before the l?" once the object's
  derived location history has >= 2 entries, l its current location and the answer the entry before.
  Rejected if l also occurs earlier in the history (our rule). Same trigger as qa2
  (>= 3 statements since the last question, probability 1/2) [ours]."""
  def ask(w, kind, since):
    if since < 3 or w.rng.random() >= 0.5:
      return None
    ok = []
    for o in OBJECTS:
      h = w.history[o]
      cur = w.object_location(o)[0]
      if len(h) >= 2 and cur == h[-1][0] and all(l != cur for l, _ in h[:-1]):
        ok.append(o)
    if not ok:
      return None
    o = _pick(w.rng, ok)
    (before, s1), (cur, s2) = w.history[o][-2], w.history[o][-1]
    return _Question(len(w.statements), f"Where was the {o} before the {cur}?", before,
                     tuple(sorted(set(s1) | set(s2))))
  return _stream_story(rng, ("move", "get", "drop"), ask)


def _story_qa5(rng):
  """qa5, three-argument relations: get/give/drop/move stream (the released data also drops); right
  after a give with >= 3 statements since the last question, ask about that give in one of five forms.
  The answer is that give's object/giver/receiver, which is the latest matching give for every form."""
  def ask(w, kind, since):
    if kind != "give" or since < 3:
      return None
    a, o, b, idx = w.last_give
    form = int(w.rng.integers(5))
    q, ans = [(f"What did {a} give to {b}?", o), (f"Who gave the {o} to {b}?", a),
              (f"Who gave the {o}?", a), (f"Who did {a} give the {o} to?", b),
              (f"Who received the {o}?", b)][form]
    return _Question(len(w.statements), q, ans, (idx,))
  return _stream_story(rng, ("move", "get", "drop", "give"), ask, actors=ACTORS_QA5)


def _story_qa4(rng):
  """qa4, two-argument relations: X, Y, Z distinct on one axis, "X d Y" and "Y d Z", each stated either
  way round (X north of Y == Y south of X) in random order; one question about one fact, asking for the
  other location of that fact: "What is d of the P?" or "What is the P d of?"."""
  first, second = (("north", "south"), ("east", "west"))[int(rng.integers(2))]
  x, y, z = (LOCATIONS[i] for i in rng.choice(len(LOCATIONS), 3, replace=False))
  relations = [(x, first, y), (y, first, z)]                  # (A, d, B): the A is d of the B
  stated = []
  for a, d, b in relations:
    stated.append((a, d, b) if rng.integers(2) else (b, _OPPOSITE[d], a))
  if rng.integers(2):
    stated.reverse()
  facts = [f"The {a} is {d} of the {b}." for a, d, b in stated]
  j = int(rng.integers(2))
  a, d, b = stated[j]
  p, other = (a, b) if rng.integers(2) else (b, a)
  d_p = d if p == a else _OPPOSITE[d]                         # p is d_p of other
  if rng.integers(2):
    q = f"What is the {p} {d_p} of?"
  else:
    q = f"What is {_OPPOSITE[d_p]} of the {p}?"                # other is opposite(d_p) of p
  return facts, [_Question(2, q, other, (j,))]


_STORIES = {"qa1": _story_qa1, "qa2": _story_qa2, "qa3": _story_qa3, "qa4": _story_qa4,
            "qa5": _story_qa5}


# ---------------------------------------------------------------------------------------------------
# Context assembly.


def length_tolerance(length: int, tokenizer=None) -> int:
  """How far the context may be from `length` tokens: 0 for the byte tokenizer, else max(4, 1%)."""
  if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
    return 0
  return max(4, length // 100)


def _truncate(tok, s: str, n: int) -> str:
  if isinstance(tok, ByteTokenizer):
    return s.encode("utf-8")[:n].decode("utf-8", errors="ignore")
  return tok.decode(tok.encode(s)[:n])


def _noise(rng_seed, budget: int, tok) -> list[str]:
  """Noise sentences whose " "-join has `budget` tokens (exactly, for the byte tokenizer)."""
  rng = np.random.default_rng(rng_seed)
  pieces, used = [], 0
  while used < budget:
    sep = 1 if pieces else 0
    room = budget - used - sep
    if room <= 0:
      # One token left and a separator needs it: an empty piece costs exactly the separator.
      pieces.append("")
      break
    s = filler_sentence(rng)
    n = num_tokens(tok, s)
    if n > room:
      s, n = _truncate(tok, s, room), room
    pieces.append(s)
    used += sep + n
  return pieces


def _assemble(facts: list[str], length: int, tok, noise_seed, slot_seed) -> str:
  if length <= 0:
    return " ".join(facts)
  facts_tokens = num_tokens(tok, " ".join(facts)) if facts else 0
  target = length - facts_tokens - (1 if facts else 0)
  best = None
  for _ in range(4):
    noise = _noise(noise_seed, target, tok) if target > 0 else []
    m = len(noise)
    slots = np.sort(np.random.default_rng(slot_seed).integers(0, m + 1, size=len(facts)))
    pieces, j = [], 0
    for i in range(m + 1):
      while j < len(facts) and slots[j] == i:
        pieces.append(facts[j])
        j += 1
      if i < m:
        pieces.append(noise[i])
    context = " ".join(pieces)
    n = num_tokens(tok, context)
    if best is None or abs(n - length) < abs(best[1] - length):
      best = (context, n)
    if n == length or target <= 0 or isinstance(tok, ByteTokenizer):
      break
    target += length - n
  return best[0]


def make_example(task: str, length: int, index: int, *, seed: int = 0, tokenizer=None,
                 split: int = 0) -> dict:
  """BABILong-style example `index` of `task` with a context of `length` tokens (0: facts only).

  Returns a dict with context, question, answer (a label of LABELS[task]), facts (the story's
  statements in order, each a substring of context), supporting (indices into facts of the statements
  the answer rests on), task, length (requested), num_tokens (actual context tokens), index.
  Deterministic in (seed, split, task, length, index); the story does not depend on length unless the
  facts must fit a smaller budget.
  """
  if task not in _STORIES:
    raise ValueError(f"unknown BABILong task {task!r}; choose from {TASKS}")
  if length < 0:
    raise ValueError(f"length must be >= 0, got {length}")
  tok = tokenizer or ByteTokenizer()
  key = [seed, split, _TASK_ID[task], index]
  rng = np.random.default_rng(key)
  for _ in range(MAX_TRIES):
    statements, questions = _STORIES[task](rng)
    fits = [q for q in questions
            if length == 0 or num_tokens(tok, " ".join(statements[:q.num_facts])) <= length]
    if fits:
      break
  else:
    raise ValueError(f"BABILong {task}: no story's facts fit in length={length} tokens after "
                     f"{MAX_TRIES} tries; use a larger length (or 0 for facts only)")
  q = fits[int(rng.integers(len(fits)))]
  facts = statements[:q.num_facts]
  context = _assemble(facts, length, tok, key + [1], key + [2])
  return {"task": task, "length": int(length), "index": int(index), "context": context,
          "question": q.question, "answer": q.answer, "facts": facts,
          "supporting": list(q.supporting), "num_tokens": num_tokens(tok, context)}


# ---------------------------------------------------------------------------------------------------
# Training / evaluation rows.

QUESTION_PREFIX = "\nQuestion: "
ANSWER_PREFIX = "\nAnswer: "


def all_questions(task: str) -> list[str]:
  """Every question string the generator can ask for `task` (used to size rows)."""
  out = []
  if task == "qa1":
    out = [f"Where is {a}?" for a in ACTORS]
  elif task == "qa2":
    out = [f"Where is the {o}?" for o in OBJECTS]
  elif task == "qa3":
    out = [f"Where was the {o} before the {l}?" for o in OBJECTS for l in LOCATIONS]
  elif task == "qa4":
    out = [f"What is the {p} {d} of?" for p in LOCATIONS for d in DIRECTIONS]
    out += [f"What is {d} of the {p}?" for p in LOCATIONS for d in DIRECTIONS]
  elif task == "qa5":
    for a in ACTORS_QA5:
      for b in ACTORS_QA5:
        for o in OBJECTS:
          out += [f"What did {a} give to {b}?", f"Who gave the {o} to {b}?", f"Who gave the {o}?",
                  f"Who did {a} give the {o} to?", f"Who received the {o}?"]
  else:
    raise ValueError(f"unknown BABILong task {task!r}")
  return out


def prompt_and_answer(example: dict) -> tuple[str, str]:
  """(context + "\\nQuestion: " + question + "\\nAnswer: ", answer)."""
  return (example["context"] + QUESTION_PREFIX + example["question"] + ANSWER_PREFIX,
          example["answer"])


def default_seq_len(tasks: Sequence[str], length: int, tokenizer=None) -> int:
  """length + tolerance + the longest question/answer suffix any of `tasks` can produce."""
  tok = tokenizer or ByteTokenizer()
  suffix = max(num_tokens(tok, QUESTION_PREFIX + q + ANSWER_PREFIX) for t in tasks
               for q in all_questions(t))
  answer = max(num_tokens(tok, a) for t in tasks for a in LABELS[t])
  # The row holds prompt + answer minus one token (inputs are the sequence without its last token).
  return length + length_tolerance(length, tokenizer) + suffix + answer - 1


class BabilongSource:
  """BABILong-style training/eval rows under the data contract (see memarch.data.text).

  Row i (i = step * batch_size + b) is `make_example(tasks[i % len(tasks)], length, i, ...)`,
  laid out as context + "\\nQuestion: " + question + "\\nAnswer: " + answer, with targets only on the
  answer tokens (-100 elsewhere) and right padding (segment 0). `seq_len` defaults to the longest row
  the source can produce (`default_seq_len`: length + tolerance + longest question and answer); length=0
  (facts only, unbounded) needs an explicit `seq_len`, and a longer row loses the start of its context.
  """

  def __init__(self, tasks: str | Sequence[str], length: int, *, batch_size: int, seed: int = 0,
               tokenizer=None, seq_len: int | None = None, split: int = 0):
    self.tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    for t in self.tasks:
      if t not in TASKS:
        raise ValueError(f"unknown BABILong task {t!r}; choose from {TASKS}")
    self.length, self.batch_size, self.seed, self.split = int(length), int(batch_size), seed, split
    self.tokenizer = tokenizer or ByteTokenizer()
    self.vocab_size = int(self.tokenizer.vocab_size)
    if seq_len is None:
      if self.length == 0:
        raise ValueError("BabilongSource(length=0) has no bounded row length; pass seq_len")
      seq_len = default_seq_len(self.tasks, self.length, self.tokenizer)
    self.seq_len = int(seq_len)

  def example(self, i: int) -> dict:
    return make_example(self.tasks[i % len(self.tasks)], self.length, i, seed=self.seed,
                        tokenizer=self.tokenizer, split=self.split)

  def encode(self, example: dict):
    """(inputs, targets, segment_ids, answer_start) for one example dict."""
    prompt, answer = prompt_and_answer(example)
    return prompt_answer_row(self.tokenizer.encode(prompt), self.tokenizer.encode(answer),
                             self.seq_len, self.tokenizer.pad_id)

  def batch(self, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    rows = [self.encode(self.example(step * self.batch_size + b))
            for b in row_range(rows, self.batch_size)]
    return {"inputs": np.stack([r[0] for r in rows]), "targets": np.stack([r[1] for r in rows]),
            "segment_ids": np.stack([r[2] for r in rows])}
