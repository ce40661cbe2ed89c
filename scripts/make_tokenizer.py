"""Generate kvmesh's demo byte-level BPE tokenizer (run once; the JSON output is committed).

The corpus is text that exists on every Debian/CPython machine (licence texts and the CPython standard
library sources), read in sorted order so a re-run on the same inputs gives the same merges.  The result is
shipped as package data: kvmesh never trains or downloads a tokenizer at run time.

    python scripts/make_tokenizer.py src/kvmesh/models/data/tokenizer.json
"""

from __future__ import annotations

import pathlib
import sys
import sysconfig

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 8192
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def corpus() -> list[str]:
    roots = [pathlib.Path("/usr/share/common-licenses"), pathlib.Path(sysconfig.get_paths()["stdlib"])]
    files: list[pathlib.Path] = []
    for root in roots:
        files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in ("", ".py", ".txt"))
    texts = []
    for f in files[:4000]:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def main(out: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok.save(out)
    print(f"wrote {out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main(sys.argv[1])
