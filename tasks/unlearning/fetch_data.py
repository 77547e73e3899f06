"""Copy the unlearning benchmarks' hub splits into $LLMMEM_DATA (default $LLMMEM_HOME/data), one jsonl per
split, laid out as PATH/CONFIG/SPLIT.jsonl, so the tasks in this directory run without the hub.

Run where the Hugging Face hub is reachable (then copy the directory to offline machines):

    python tasks/unlearning/fetch_data.py                 # TOFU + MUSE-News + MUSE-Books
    python tasks/unlearning/fetch_data.py tofu            # one benchmark
    LLMMEM_DATA=/data/llmmem python tasks/unlearning/fetch_data.py

WMDP's questions are read by lm-evaluation-harness itself (tasks wmdp_bio, wmdp_cyber, wmdp_chem, mmlu) from
its own hub cache; the RMU forget/retain corpora come from the WMDP authors (cais/wmdp-corpora, gated:
bio-forget-corpus) and open-unlearning's ``python setup_data.py --wmdp`` (cyber corpora).
"""

from __future__ import annotations

import json
import sys

from llmmem.tasks import data_dir

TOFU = [f"{k}{n}" for n in ("01", "05", "10") for k in ("forget", "holdout")] + \
       [f"forget{n}_perturbed" for n in ("01", "05", "10")] + ["retain90", "retain95", "retain99", "retain_perturbed",
                                                              "real_authors_perturbed", "world_facts_perturbed", "full"]
MUSE = {"verbmem": ["forget"], "knowmem": ["forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl"],
        "privleak": ["forget", "retain", "holdout"], "raw": ["forget", "holdout", "retain1", "retain2"]}
SOURCES = {"tofu": [("locuslab/TOFU", c, "train") for c in TOFU],
           "muse": [(f"muse-bench/MUSE-{corpus}", c, s) for corpus in ("News", "Books") for c, splits in MUSE.items()
                    for s in splits]}


def fetch(path: str, config: str, split: str) -> None:
    import datasets

    out = data_dir() / path / config / f"{split}.jsonl"
    if out.is_file():
        print(f"have {out}")
        return
    ds = datasets.load_dataset(path, config, split=split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in ds:
            fh.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    tmp.rename(out)
    print(f"wrote {out} ({len(ds)} rows)")


def main(argv: list[str]) -> int:
    wanted = argv or list(SOURCES)
    unknown = [w for w in wanted if w not in SOURCES]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from: {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    for name in wanted:
        for path, config, split in SOURCES[name]:
            fetch(path, config, split)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
