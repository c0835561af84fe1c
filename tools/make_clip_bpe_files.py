"""Regenerate lora_scripts/models/configs/clip_bpe/{vocab.json,merges.txt} from CLIP's BPE merges file.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the ``open-clip-torch`` wheel on PyPI (MIT licence; the file is
OpenAI CLIP's, also MIT). The output is the layout of the Hugging Face CLIP tokenizer (openai/clip-vit-large-patch14,
also used by SD 2 and SDXL): 256 byte tokens, the same with ``</w>``, one token per merge, then the two specials.

    pip download --no-deps open-clip-torch -d /tmp/oc && unzip /tmp/oc/*.whl 'open_clip/bpe_*' -d /tmp/oc
    python tools/make_clip_bpe_files.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from lora_scripts.testing import _bytes_to_unicode

OUT = Path(__file__).resolve().parents[1] / "lora_scripts" / "models" / "configs" / "clip_bpe"


def main(bpe_gz: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # what CLIP's SimpleTokenizer uses
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                    encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(tokens)} tokens, {len(merges)} merges -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
