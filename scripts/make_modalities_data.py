"""Write data/modalities/: the main job's task as chat JSONL in the form Modalities' loss-masking configs expect,
then its .idx and .pbin files with lorafit's own Modalities data tools. Deterministic; run from the repo root:

    python scripts/make_modalities_data.py

Each line is {"chat": "User: <prompt>\\nAssistant: <|im_start|><answer><|im_end|>\\n"}: the answer sits between the
two marker tokens that configs/modalities/config_lorem_ipsum_lora.yaml's mask_loss_collator_wrapper names
(b_include_to_loss_token <|im_start|>, e_include_to_loss_token <|im_end|>), so only answer tokens are trained on.
train: the first 400 training conversations; val / test: the 64 held-out ones, halved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OUT = Path("data/modalities")
PREP_CONFIG = "configs/modalities/packed_dataset_config_lora_smol.yaml"


def chat_line(record: dict) -> str:
    user = next(m["content"] for m in record["messages"] if m["role"] == "user")
    answer = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
    return json.dumps({"chat": f"User: {user}\nAssistant: <|im_start|>{answer}<|im_end|>\n"})


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    train = [json.loads(line) for line in Path("data/task/train.jsonl").read_text().splitlines()][:400]
    heldout = [json.loads(line) for line in Path("data/task/heldout.jsonl").read_text().splitlines()]
    splits = {"train": train, "val": heldout[:32], "test": heldout[32:64]}
    for name, records in splits.items():
        stem = OUT / f"chat_{name}"
        for suffix in (".jsonl", ".idx", ".pbin"):
            stem.with_suffix(suffix).unlink(missing_ok=True)
        stem.with_suffix(".jsonl").write_text("".join(chat_line(r) + "\n" for r in records))
        lorafit = [sys.executable, "-m", "lorafit", "data"]
        subprocess.run([*lorafit, "create_raw_index", str(stem.with_suffix(".jsonl"))], check=True)
        subprocess.run(
            [
                *lorafit,
                "pack_encoded_data",
                PREP_CONFIG,
                f"settings.src_path={stem}.jsonl",
                f"settings.index_path={stem}.idx",
                f"settings.dst_path={stem}.pbin",
                # the shipped training configs are the lora branch's: its packing (eod always appended) makes each
                # padded 128-token document one block of sequence_length + 1
                "--modalities_release",
                "lora_branch",
            ],
            check=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
