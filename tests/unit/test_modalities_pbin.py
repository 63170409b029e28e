""".pbin and .idx files against the real Modalities package (modalities==0.5.0 from PyPI): both directions,
byte for byte, and indexes that would run code are refused without running it."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorafit.cli import main
from lorafit.data.pbin import read_pbin, read_raw_index, write_pbin
from lorafit.errors import UserError

TEXTS = [
    "User: What is 2+2?\nAssistant: <|im_start|>4<|im_end|>",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🙂 and a second sentence.",
    "short",
]


def _write_jsonl(path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps({"chat": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


def _prep_config(tmp: Path, model_dir: Path, src: Path, dst: Path) -> Path:
    """A Modalities data-preparation config both tools accept (no special_tokens: modalities 0.5.0 passes a
    keyword that transformers 5 renamed)."""
    config = {
        "settings": {
            "src_path": str(src),
            "dst_path": str(dst),
            "index_path": str(src.with_suffix(".idx")),
            "jq_pattern": ".chat",
            "num_cpus": 1,
            "eod_token": "<|endoftext|>",
            "processing_batch_size": 2,
            "raw_samples_queue_size": 10,
            "processed_samples_queue_size": 10,
        },
        "tokenizer": {
            "component_key": "tokenizer",
            "variant_key": "pretrained_hf_tokenizer",
            "config": {"pretrained_model_name_or_path": str(model_dir), "padding": False, "truncation": False},
        },
    }
    path = tmp / f"{dst.stem}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def packed_both(tmp_path_factory, smollm2_dir):
    """The same JSONL indexed and packed by lorafit and by Modalities."""
    # modalities 0.5.0's config module imports a tokenizer module transformers 5 removed: use its data classes
    from modalities.dataloader.create_index import IndexGenerator
    from modalities.dataloader.create_packed_data import PackedDataGenerator
    from modalities.tokenization.tokenizer_wrapper import PreTrainedHFTokenizer

    tmp = tmp_path_factory.mktemp("pbin")
    ours, theirs = tmp / "ours", tmp / "theirs"
    ours.mkdir()
    theirs.mkdir()
    out = {}
    for who, folder in (("ours", ours), ("theirs", theirs)):
        src = _write_jsonl(folder / "docs.jsonl")
        config = _prep_config(folder, smollm2_dir, src, folder / "docs.pbin")
        if who == "ours":
            assert main(["data", "create_raw_index", str(src)]) == 0
            assert main(["data", "pack_encoded_data", str(config)]) == 0
        else:
            IndexGenerator(src).create_index(src.with_suffix(".idx"))
            settings = yaml.safe_load(config.read_text())["settings"]
            PackedDataGenerator(
                src,
                tokenizer=PreTrainedHFTokenizer(str(smollm2_dir), truncation=False, padding=False),
                eod_token=settings["eod_token"],
                number_of_processes=1,
                jq_pattern=settings["jq_pattern"],
                processing_batch_size=2,
                raw_samples_queue_size=10,
                processed_samples_queue_size=10,
                index_path=src.with_suffix(".idx"),
            ).run(folder / "docs.pbin")
        out[who] = folder
    return out


def test_raw_index_and_pbin_are_byte_identical_to_modalities(packed_both):
    ours, theirs = packed_both["ours"], packed_both["theirs"]
    assert (ours / "docs.idx").read_bytes() == (theirs / "docs.idx").read_bytes()
    assert (ours / "docs.pbin").read_bytes() == (theirs / "docs.pbin").read_bytes()


def test_lorafit_reads_what_modalities_wrote(packed_both, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    pbin = read_pbin(packed_both["theirs"] / "docs.pbin")
    assert pbin.token_size == 2 and pbin.num_documents == len(TEXTS)
    for i, text in enumerate(TEXTS):
        assert pbin.document(i).tolist() == [*tok(text)["input_ids"], 0]  # <|endoftext|> = 0 closes each one
    idx = read_raw_index(packed_both["theirs"] / "docs.idx")
    raw = (packed_both["theirs"] / "docs.jsonl").read_bytes()
    assert [raw[s : s + n].decode() for s, n in idx.tolist()] == raw.decode().splitlines()


def test_modalities_reads_what_lorafit_wrote(tmp_path):
    from modalities.dataloader.create_packed_data import EmbeddedStreamData
    from modalities.dataloader.dataset import PackedMemMapDatasetContinuous

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 49152, size=n).tolist() for n in (5, 17, 1, 40)]
    path = tmp_path / "x.pbin"
    assert write_pbin(path, docs, token_size=2) == 4
    stream = EmbeddedStreamData(path)
    assert stream.token_size_in_bytes == 2 and stream.data_len == 2 * sum(map(len, docs))
    for (offset, length), doc in zip(stream.index_base, docs, strict=True):
        assert np.frombuffer(stream.data, dtype="<u2", count=length // 2, offset=offset).tolist() == doc
    flat = [t for d in docs for t in d]
    for reuse in (True, False):
        ds = PackedMemMapDatasetContinuous(path, sample_key="input_ids", block_size=9, reuse_last_target=reuse)
        step = 8 if reuse else 9
        assert len(ds) == ((len(flat) - 9) // 8 + 1 if reuse else len(flat) // 9)
        assert ds[1]["input_ids"].tolist() == flat[step : step + 9]
    assert read_pbin(path).document(3).tolist() == docs[3]


class _Boom:
    """What an attacker pickles: unpickling it calls Path.touch on a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pbin_with_index(path: Path, index_bytes: bytes) -> Path:
    tokens = np.arange(6, dtype="<u2").tobytes()
    path.write_bytes(len(tokens).to_bytes(8, "little") + (2).to_bytes(4, "little") + tokens + index_bytes)
    return path


def test_poisoned_index_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _pbin_with_index(tmp_path / "evil.pbin", pickle.dumps([(0, 4), _Boom(marker)]))
    with pytest.raises(UserError, match=r"refused to read its index: .*global .*nothing in it was run"):
        read_pbin(path)
    assert not marker.exists()
    (tmp_path / "evil.idx").write_bytes(pickle.dumps([_Boom(marker)]))
    with pytest.raises(UserError, match="refused"):
        read_raw_index(tmp_path / "evil.idx")
    assert not marker.exists()
    assert main(["data", "create_raw_index", str(tmp_path / "evil.idx")]) == 2  # and the CLI says so, exit 2


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"a": 1}, "is a dict, expected a list"),
        ([(0, 4), (4, "x")], "entry 1 is"),
        ([(0, 4, 1)], "entry 0 is"),
        ([(0, True)], "entry 0 is"),
        ([(2, 100)], "does not lie on whole tokens"),
        ([(1, 2)], "does not lie on whole tokens"),
    ],
)
def test_index_that_is_not_integer_pairs_inside_the_data_is_refused(tmp_path, index, message):
    path = _pbin_with_index(tmp_path / "bad.pbin", pickle.dumps(index))
    with pytest.raises(UserError, match=message):
        read_pbin(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = tmp_path / "g.pbin"
    write_pbin(good, [[1, 2, 3]], token_size=2)
    (tmp_path / "t.pbin").write_bytes(good.read_bytes()[:14])
    with pytest.raises(UserError, match="truncated"):
        read_pbin(tmp_path / "t.pbin")
    (tmp_path / "f.pbin").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(UserError, match="bytes per token"):
        read_pbin(tmp_path / "f.pbin")


def test_shipped_pbin_is_what_pack_encoded_data_makes(tmp_path, smollm2_dir):
    """data/modalities/chat_*.pbin are reproducible from the shipped JSONL and data-preparation config."""
    repo = Path(__file__).resolve().parents[2]
    config = repo / "configs/modalities/packed_dataset_config_lora_smol.yaml"
    src = repo / "data/modalities/chat_val.jsonl"
    dst = tmp_path / "val.pbin"
    assert (
        main(
            [
                "data",
                "pack_encoded_data",
                str(config),
                f"settings.src_path={src}",
                f"settings.index_path={src.with_suffix('.idx')}",
                f"settings.dst_path={dst}",
                f"tokenizer.config.pretrained_model_name_or_path={smollm2_dir}",
                "--modalities_release",  # the shipped data is packed for the lora branch's configs
                "lora_branch",
            ]
        )
        == 0
    )
    assert dst.read_bytes() == src.with_suffix(".pbin").read_bytes()
    pbin = read_pbin(dst)
    assert {int(n) for n in pbin.index[:, 1]} == {129 * 2}  # 128 tokens (padded/truncated) + EOD per document
    assert (
        main(
            [
                "data",
                "pack_encoded_data",
                str(config),
                f"settings.src_path={src}",
                f"settings.index_path={src.with_suffix('.idx')}",
                f"settings.dst_path={dst}",
            ]
        )
        == 2
    )
