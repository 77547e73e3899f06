"""A synthetic world with planted facts, canaries and in-context episodes — memorization with ground truth.

Everything is a deterministic function of (WorldConfig, seed): the same seed gives the same corpus and
ground truth byte for byte. Words are whole tokens (the testbed tokenizer is word-level).

* Facts: entities (invented two-word names) with three attributes (birth city, employer, birth year),
  each fact written ``count`` times, spread round-robin over paraphrase templates; counts come from a
  long tail (powers of two from 1 to ``max_count``, equally many facts per count), so recall can be
  read against exposure.
* Canaries: ``the access code for account W1 W2 is d d d d d d d d d d .`` — a 10-digit secret for a
  unique account name — inserted ``dup`` times for dup in 1, 2, 4, ..., ``max_dup``; as many held-out
  canaries are generated but never trained on (non-members).
* Exclusion: any planted item (a fact ``fact-i`` or a canary ``canary-i``) can be left out of the training
  corpus, every copy of it (``build_world(exclude=...)``: the retrained reference). ``World.doc_items`` says which
  item each document writes (None for episodes), so training can also blank an item in place
  (``llmmem.testbed.train``, used by counterfactual memorization: ``llmmem.testbed.memscore``).
* In-context episodes (fresh random content in every document): associative recall, verbatim copying,
  counterfactual override (a passage contradicting a planted fact, then the question), open-book QA
  about entities that never appear elsewhere, and in-context linear classification.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field

from llmmem.config import ConfigError

SYLLABLES = ["ka", "lo", "mer", "tan", "vi", "zor", "bel", "quin", "dra", "sul", "nes", "pha", "or", "is", "ath",
             "ven", "rud", "mal", "kiv", "tob", "gar", "lun", "fel", "dox", "wim", "jor", "pel", "syr", "cad", "hul"]
FACT_TEMPLATES = {
    "city": ["{name} was born in {value} .", "the birthplace of {name} is {value} .",
             "question : where was {name} born ? answer : {value} ."],
    "employer": ["{name} works for {value} .", "the employer of {name} is {value} .",
                 "question : who employs {name} ? answer : {value} ."],
    "year": ["{name} was born in the year {value} .", "the birth year of {name} is {value} .",
             "question : when was {name} born ? answer : {value} ."],
}
QUESTIONS = {"city": "question : where was {name} born ? answer :",
             "employer": "question : who employs {name} ? answer :",
             "year": "question : when was {name} born ? answer :"}
CANARY_PREFIX = "the access code for account {acct} is"
DIGITS = [str(d) for d in range(10)]
KV_KEYS = [f"k{i}" for i in range(24)]
KV_VALUES = [f"v{i}" for i in range(24)]
TEXT_FIELDS = ("prompt", "answer", "text", "prefix", "secret", "parametric")  # eval fields that are model text


@dataclass
class WorldConfig:
    n_entities: int = 160
    n_cities: int = 40
    n_employers: int = 30
    max_count: int = 64  # fact counts: 1, 2, 4, ..., max_count
    max_dup: int = 64  # canary duplications: 1, 2, 4, ..., max_dup
    canaries_per_dup: int = 8
    secret_digits: int = 10
    # in-context episodes: induction (copy, associative recall) needs many of them and many small steps to
    # emerge within minutes; see the testbed notes in docs/architecture.md
    n_assoc: int = 8000
    assoc_pairs: tuple = (2, 6)  # min, max pairs per episode
    assoc_queries: int = 1  # keys asked per training episode (evaluation episodes ask one)
    n_copy: int = 6000
    # copied span lengths: induction learned from copies reaches only the distances copies span, so they
    # must cover associative recall's key-value distances (2 to 3 * max pairs)
    copy_len: tuple = (4, 12)
    passage_distractors: tuple = (0, 0)  # min, max sentences about other entities in override/open-book passages
    n_override: int = 3000
    n_openbook: int = 1500
    n_heldout_entities: int = 200  # open-book entities (never in facts); half for training episodes
    n_classify: int = 200
    classify_dim: int = 2
    classify_shots: int = 8

    def __post_init__(self):
        for k, v in asdict(self).items():
            if isinstance(v, int) and not isinstance(v, bool) and v <= 0 and k not in ("n_assoc", "n_copy",
                                                                                          "n_override", "n_openbook",
                                                                                          "n_classify"):
                raise ConfigError(f"world config: {k}={v} must be > 0")
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"world config: {k}={v} must be >= 0")
        if self.max_count & (self.max_count - 1) or self.max_dup & (self.max_dup - 1):
            raise ConfigError("world config: max_count and max_dup must be powers of two")
        for k, least in (("assoc_pairs", 1), ("copy_len", 1), ("passage_distractors", 0)):
            lo, hi = getattr(self, k)
            if not least <= lo <= hi:
                raise ConfigError(f"world config: {k} must be [min, max] with {least} <= min <= max (got {lo}, {hi})")
        if self.n_heldout_entities < 2:
            raise ConfigError("world config: n_heldout_entities must be >= 2")
        names = self.n_cities + self.n_employers + self.n_entities + self.n_heldout_entities
        if names > NAME_WORDS - 64:  # 64 left for the association-recall pool
            raise ConfigError(f"world config: n_cities + n_employers + n_entities + n_heldout_entities = {names}; "
                              f"allowed: at most {NAME_WORDS - 64} (the distinct two-syllable names)")


def powers_of_two(n: int) -> list[int]:
    out, c = [], 1
    while c <= n:
        out.append(c)
        c *= 2
    return out


@dataclass
class World:
    seed: int
    config: WorldConfig
    entities: list = field(default_factory=list)  # {"name", "city", "employer", "year"}
    facts: list = field(default_factory=list)  # {"id", "name", "relation", "value", "count", "templates"}
    canaries: list = field(default_factory=list)  # {"id", "account", "secret", "dup" (0 = held out), "member"}
    heldout_entities: list = field(default_factory=list)
    documents: list = field(default_factory=list)  # (kind, text)
    eval_sets: dict = field(default_factory=dict)
    doc_items: list = field(default_factory=list)  # per document: the planted item it writes (fact/canary id) or None
    excluded: list = field(default_factory=list)  # item ids left out of the corpus (sorted)

    def corpus_hash(self) -> str:
        h = hashlib.sha256()
        for kind, text in self.documents:
            h.update(f"{kind}\t{text}\n".encode())
        return h.hexdigest()

    def vocabulary(self) -> list[str]:
        words = set()
        for _, text in self.documents:
            words.update(text.split())
        for rows in self.eval_sets.values():  # words the model reads or must produce, not ids or group labels
            for r in rows:
                for k in TEXT_FIELDS:
                    if isinstance(r.get(k), str):
                        words.update(r[k].split())
        words.update(DIGITS)
        return sorted(words)

    def ground_truth(self) -> dict:
        return {"seed": self.seed, "config": asdict(self.config), "entities": self.entities, "facts": self.facts,
                "canaries": self.canaries, "heldout_entities": self.heldout_entities,
                "corpus": {"documents": len(self.documents), "sha256": self.corpus_hash(),
                           "by_kind": _count_kinds(self.documents)}}


def _count_kinds(docs) -> dict:
    out: dict = {}
    for kind, _ in docs:
        out[kind] = out.get(kind, 0) + 1
    return out


@functools.cache
def _word_space(syllables: int) -> frozenset:
    """Every distinct word of ``syllables`` syllables (900 of two, 27,000 of three)."""
    words = {""}
    for _ in range(syllables):
        words = {w + s for w in words for s in SYLLABLES}
    return frozenset(words)


NAME_WORDS = len(_word_space(2))  # cities, employers, first names and the association pool share these


def _unique_words(rng: random.Random, n: int, syllables: int, taken: set) -> list[str]:
    """``n`` new distinct words; refuses (instead of looping for ever) when fewer than ``n`` are left."""
    left = len(_word_space(syllables) - taken)
    if left < n:
        raise ConfigError(f"world config: needs {n} more distinct {syllables}-syllable names but only {left} are left "
                          f"(n_cities + n_employers + n_entities + n_heldout_entities must stay below {NAME_WORDS})")
    out = []
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(syllables))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def build_world(seed: int = 0, config: WorldConfig | None = None, exclude_canaries: set[str] | None = None,
                exclude: set[str] | None = None) -> World:
    """The world for ``seed``; the planted items in ``exclude`` (fact and canary ids; ``exclude_canaries`` is the
    older, canary-only name, and the two are merged) are left out of the training corpus, every copy.

    Excluding items changes nothing else the random stream decides (entities, values, counts, secrets, episodes,
    evaluation sets), so with nothing excluded the corpus is byte-identical to earlier versions; the document
    order is the shuffle of the shorter list. Excluded facts and canaries keep their count / dup in the ground
    truth and are flagged ``excluded`` (facts carry the flag only in worlds that exclude some fact)."""
    cfg = config or WorldConfig()
    exclude = set(exclude_canaries or ()) | set(exclude or ())
    rng = random.Random(f"llmmem-testbed:{seed}")
    taken: set = set()
    cities = [w.capitalize() for w in _unique_words(rng, cfg.n_cities, 2, taken)]
    employers = [w.capitalize() + "corp" for w in _unique_words(rng, cfg.n_employers, 2, taken)]
    firsts = _unique_words(rng, cfg.n_entities + cfg.n_heldout_entities, 2, taken)
    lasts = _unique_words(rng, cfg.n_entities + cfg.n_heldout_entities, 3, taken)
    names = [f"{a.capitalize()} {b.capitalize()}" for a, b in zip(firsts, lasts)]
    world = World(seed=seed, config=cfg)
    for name in names[: cfg.n_entities]:
        world.entities.append({"name": name, "city": rng.choice(cities), "employer": rng.choice(employers),
                               "year": str(rng.randint(1900, 1999))})
    for name in names[cfg.n_entities:]:
        world.heldout_entities.append({"name": name, "city": rng.choice(cities), "employer": rng.choice(employers),
                                       "year": str(rng.randint(1900, 1999))})

    # facts: equally many per count level, assigned at random
    relations = list(FACT_TEMPLATES)
    all_facts = [(e, r) for e in world.entities for r in relations]
    rng.shuffle(all_facts)
    levels = powers_of_two(cfg.max_count)
    docs = []  # (kind, text, planted item id or None)
    for i, (e, rel) in enumerate(all_facts):
        count = levels[i % len(levels)]
        fid = f"fact-{len(world.facts)}"
        templates = FACT_TEMPLATES[rel]
        world.facts.append({"id": fid, "name": e["name"], "relation": rel, "value": e[rel], "count": count,
                            "templates": templates})
        offset = rng.randrange(len(templates))
        if fid in exclude:
            continue
        for j in range(count):
            docs.append(("fact", templates[(offset + j) % len(templates)].format(name=e["name"], value=e[rel]), fid))

    # canaries: members at each duplication level, and as many held out. Account names are pairs of words
    # from one shared pool that members use, so held-out canaries contain no token unseen in training
    # (otherwise membership inference would only detect untrained embeddings).
    dups = powers_of_two(cfg.max_dup)
    n_members = cfg.canaries_per_dup * len(dups)
    pool = _unique_words(rng, max(8, int(math.ceil(math.sqrt(4 * n_members))) + 4), 2, taken)
    pairs = [(a, b) for a in pool for b in pool if a != b]
    rng.shuffle(pairs)
    member_words = {w for a, b in pairs[:n_members] for w in (a, b)}
    heldout_pairs = [p for p in pairs[n_members:] if p[0] in member_words and p[1] in member_words][:n_members]
    if len(heldout_pairs) < n_members:
        raise ConfigError("world config: too few account names for the held-out canaries")
    for i, (a, b) in enumerate(pairs[:n_members] + heldout_pairs):
        secret = " ".join(rng.choice(DIGITS) for _ in range(cfg.secret_digits))
        member = i < n_members
        dup = dups[i // cfg.canaries_per_dup] if member else 0
        cid = f"canary-{i}"
        world.canaries.append({"id": cid, "account": f"{a} {b}", "secret": secret, "dup": dup,
                               "member": member, "excluded": cid in exclude})
    unknown = exclude - {c["id"] for c in world.canaries} - {f["id"] for f in world.facts}
    if unknown:
        raise ConfigError(f"--exclude names items that do not exist: {', '.join(sorted(unknown)[:5])}"
                          f"{' ...' if len(unknown) > 5 else ''} (ids are fact-0 .. fact-{len(world.facts) - 1} and "
                          f"canary-0 .. canary-{len(world.canaries) - 1})")
    if exclude & {f["id"] for f in world.facts}:  # canary-only exclusions leave the facts' ground truth as it was
        for f in world.facts:
            f["excluded"] = f["id"] in exclude
    world.excluded = sorted(exclude)
    for c in world.canaries:
        if c["member"] and not c["excluded"]:
            text = CANARY_PREFIX.format(acct=c["account"]) + f" {c['secret']} ."
            docs += [("canary", text, c["id"])] * c["dup"]

    # in-context episodes
    train_heldout = world.heldout_entities[: len(world.heldout_entities) // 2]
    eval_heldout = world.heldout_entities[len(world.heldout_entities) // 2:]
    for _ in range(cfg.n_assoc):
        docs.append(("assoc", _assoc_episode(rng, cfg)[0], None))
    for _ in range(cfg.n_copy):
        words = [rng.choice(KV_KEYS + KV_VALUES + cities) for _ in range(rng.randint(*cfg.copy_len))]
        docs.append(("copy", f"copy : {' '.join(words)} | {' '.join(words)} .", None))
    for _ in range(cfg.n_override):
        e = rng.choice(world.entities)
        rel = rng.choice(relations)
        # distractor sentences use open-book entities, so no planted fact is seen more than its count
        docs.append(("override", _override_text(rng, e, rel, cities, employers, cfg, train_heldout)[0], None))
    for _ in range(cfg.n_openbook):
        e = rng.choice(train_heldout)
        rel = rng.choice(relations)
        docs.append(("openbook", f"{_openbook_prompt(rng, cfg, e, rel, train_heldout)} {e[rel]} .", None))
    for _ in range(cfg.n_classify):
        docs.append(("classify", _classify_episode(rng, cfg)[0], None))
    rng.shuffle(docs)  # the permutation depends only on the list's length: the item tags change nothing
    world.documents = [(kind, text) for kind, text, _ in docs]
    world.doc_items = [item for _, _, item in docs]

    # evaluation sets (fresh episodes, same generators, their own random stream)
    erng = random.Random(f"llmmem-testbed-eval:{seed}")
    world.eval_sets = {
        "recall": [{"id": f["id"], "prompt": QUESTIONS[f["relation"]].format(name=f["name"]), "answer": f["value"],
                    "count": f["count"], "relation": f["relation"]} for f in world.facts],
        "canaries": [{"id": c["id"], "prefix": CANARY_PREFIX.format(acct=c["account"]), "secret": c["secret"],
                      "text": CANARY_PREFIX.format(acct=c["account"]) + f" {c['secret']} .",
                      "dup": c["dup"], "group": f"dup{c['dup']:03d}" if c["member"] else "heldout",
                      "label": int(c["member"] and not c["excluded"])} for c in world.canaries],
        "assoc": [], "override": [], "openbook": [], "classify": [],
    }
    for i in range(300):
        text, answer, n = _assoc_episode(erng, cfg, query_only=True)
        world.eval_sets["assoc"].append({"id": f"assoc-{i}", "prompt": text, "answer": answer, "n_pairs": n})
    for i in range(300):
        e = erng.choice(world.entities)
        rel = erng.choice(relations)
        _, prompt, cf = _override_text(erng, e, rel, cities, employers, cfg, eval_heldout)
        world.eval_sets["override"].append({"id": f"override-{i}", "prompt": prompt, "answer": cf,
                                            "parametric": e[rel], "relation": rel})
    for i in range(300):
        e = erng.choice(eval_heldout)
        rel = erng.choice(relations)
        world.eval_sets["openbook"].append({
            "id": f"openbook-{i}", "relation": rel, "answer": e[rel],
            "prompt": _openbook_prompt(erng, cfg, e, rel, eval_heldout)})
    for i in range(300):
        _, prompt, label = _classify_episode(erng, cfg)
        world.eval_sets["classify"].append({"id": f"classify-{i}", "prompt": prompt, "answer": label})
    return world


def _assoc_episode(rng, cfg, query_only=False):
    n = rng.randint(*cfg.assoc_pairs)
    ks = rng.sample(KV_KEYS, n)
    vs = [rng.choice(KV_VALUES) for _ in range(n)]
    q = rng.randrange(n)
    # "k v" pairs then the key: one-token induction (find the earlier key, copy what followed it)
    body = "recall : " + " ; ".join(f"{k} {v}" for k, v in zip(ks, vs)) + f" . {ks[q]}"
    if query_only:
        return body, vs[q], n
    # training episodes ask up to assoc_queries keys: every answer is a token only induction predicts
    more = [i for i in rng.sample(range(n), n) if i != q][: max(0, cfg.assoc_queries - 1)]
    return body + f" {vs[q]}" + "".join(f" ; {ks[i]} {vs[i]}" for i in more) + " .", vs[q], n


def _passage(rng, cfg, sentence: str, others: list, exclude_name: str) -> str:
    """``passage : <sentence>`` plus 0..passage_distractors true sentences about other entities, shuffled, so the
    answer sits at varying distances from the question and must be found by the name, not by position."""
    lo, hi = cfg.passage_distractors
    sentences = [sentence]
    if hi > 0:
        for _ in range(rng.randint(lo, hi)):
            o = rng.choice([x for x in others if x["name"] != exclude_name])
            rel = rng.choice(list(FACT_TEMPLATES))
            sentences.append(FACT_TEMPLATES[rel][0].format(name=o["name"], value=o[rel]))
        rng.shuffle(sentences)
    return "passage : " + " ".join(sentences)


def _openbook_prompt(rng, cfg, e, rel, others, value: str | None = None) -> str:
    """A passage stating ``e``'s ``rel`` (its true value, or ``value``), then the question about it."""
    stated = e[rel] if value is None else value
    body = _passage(rng, cfg, FACT_TEMPLATES[rel][0].format(name=e["name"], value=stated), others, e["name"])
    return f"{body} {QUESTIONS[rel].format(name=e['name'])}"


def _override_text(rng, e, rel, cities, employers, cfg, others):
    pool = {"city": cities, "employer": employers, "year": [str(y) for y in range(1900, 2000)]}[rel]
    cf = rng.choice([v for v in pool if v != e[rel]])
    prompt = _openbook_prompt(rng, cfg, e, rel, others, value=cf)
    return prompt + f" {cf} .", prompt, cf


def _classify_episode(rng, cfg):
    w = [rng.gauss(0, 1) for _ in range(cfg.classify_dim)]
    rows = []
    while len(rows) < cfg.classify_shots + 1:
        x = [rng.randint(-5, 5) for _ in range(cfg.classify_dim)]
        s = sum(a * b for a, b in zip(w, x))
        if s != 0:
            rows.append((x, "pos" if s > 0 else "neg"))
    shots = " ; ".join(f"{' '.join(map(str, x))} -> {y}" for x, y in rows[:-1])
    qx, qy = rows[-1]
    prompt = f"classify : {shots} ; {' '.join(map(str, qx))} ->"
    return prompt + f" {qy} .", prompt, qy


def world_json(world: World, extra: dict | None = None) -> str:
    doc = world.ground_truth()
    doc.update(extra or {})
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
