"""Issue 8 (the datamodule is told its tokenizer and source) and issue 9 (input checks): each bad input
fails with a message naming the problem and the fix, before any compute. Offline, tiny models only."""

from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch

from dpruner_lightning import assets, data
from dpruner_lightning.algorithms.targets import DEFAULT_EXCLUDE, find_targets
from dpruner_lightning.config import ModelSpec
from dpruner_lightning.corpora import document_hash
from dpruner_lightning.data import CalibrationDataModule, TextSource, load_documents, load_records
from dpruner_lightning.models import byte_tokenizer, check_model_source, check_seq_len, load_causal_lm, max_positions

from .conftest import SMOKE, TINY, tiny_model
from .helpers import smoke_data, tiny_spec


@pytest.fixture
def offline(monkeypatch):
    """Any hub access fails at once instead of retrying over the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- Issue 8: use_tokenizer / serve / lazy tokenisation -----------------------------------------


def test_data_module_never_reaches_up_to_the_lightning_module():
    source = inspect.getsource(data)
    assert "lightning_module" not in source and "current_pass" not in source


def test_setup_needs_no_tokenizer_and_tokenises_on_first_need():
    dm = smoke_data()
    dm.setup("fit")  # before any tokenizer, as Lightning calls it
    docs = dm.source_documents()
    assert set(docs) == {"general", "domain"} and all(cal and held for cal, held in docs.values())
    assert dm.eval_names == ("domain", "general")
    with pytest.raises(ValueError, match="needs a tokenizer.*use_tokenizer"):
        dm.train_dataloader()
    dm.use_tokenizer(byte_tokenizer())
    named = smoke_data(tokenizer="bytes")
    named.setup("fit")
    for name in ("general", "domain"):  # the same seeded blocks as with a named tokenizer
        assert torch.equal(dm.calibration[name], named.calibration[name])
        assert torch.equal(dm.evaluation[name], named.evaluation[name])
    assert dm.eval_names == ("domain", "general")


def test_use_tokenizer_does_not_replace_a_named_or_already_used_tokenizer():
    dm = smoke_data(tokenizer="bytes")
    dm.use_tokenizer(object())  # would fail if it were used
    blocks = dm.calibration["general"]
    given = smoke_data()
    given.use_tokenizer(byte_tokenizer())
    given.prepare_blocks()
    given.use_tokenizer(object())  # already tokenised: ignored
    assert torch.equal(given.calibration["general"], blocks)


def test_serve_chooses_the_calibration_set_of_the_training_loader():
    dm = smoke_data(tokenizer="bytes", batch_size=6)
    assert torch.equal(next(iter(dm.train_dataloader()))["input_ids"], dm.calibration["general"])  # default
    dm.serve("domain")
    assert torch.equal(next(iter(dm.train_dataloader()))["input_ids"], dm.calibration["domain"])
    with pytest.raises(ValueError, match="unknown calibration source 'medical'.*'general' or 'domain'"):
        dm.serve("medical")


def test_from_token_blocks_needs_no_tokenizer():
    blocks = [torch.arange(8).view(2, 4) + i for i in range(4)]
    dm = CalibrationDataModule.from_token_blocks(*blocks)
    dm.setup("fit")
    dm.serve("domain")
    assert torch.equal(next(iter(dm.train_dataloader()))["input_ids"], blocks[1][:1])
    assert dm.eval_names == ("domain", "general") and len(dm.val_dataloader()) == 2


# --- 1. texts must be a list of strings ----------------------------------------------------------


def test_texts_given_as_one_string_is_refused():
    with pytest.raises(ValueError, match="texts must be a list of strings, got a str: wrap it in a list"):
        TextSource(texts="one long document, not one per character")


def test_texts_with_a_non_string_item_names_its_index():
    with pytest.raises(ValueError, match=r"texts\[1\] is a int, not a str"):
        TextSource(texts=["fine", 3])


def test_texts_are_stored_as_a_list():
    source = TextSource(texts=("a document", "another"))
    assert source.texts == ["a document", "another"] and load_documents(source) == ["a document", "another"]


# --- 2. evaluation text never overlaps calibration text ------------------------------------------


def test_held_out_documents_leave_every_calibration_set(caplog):
    same = str(SMOKE / "domain.txt")  # the same file as both sources: each split alone would leak
    dm = CalibrationDataModule(general=TextSource(path=same), domain=TextSource(path=same), eval_fraction=0.2,
                               seq_len=16, num_samples=2)
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning.data"):
        dm.setup()
    docs = dm.source_documents()
    held = {document_hash(d) for _, out in docs.values() for d in out}
    assert held
    for name, (calibration, _) in docs.items():
        assert calibration and not held & {document_hash(d) for d in calibration}, name
    assert any("removed" in r.getMessage() and "held out for evaluation" in r.getMessage() for r in caplog.records)


def write_docs(path, docs):
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return str(path)


def test_explicit_eval_text_sharing_calibration_documents_is_refused(tmp_path):
    docs = [f"Document number {i} about a topic." for i in range(10)]
    calibration = write_docs(tmp_path / "cal.txt", docs)
    evaluation = write_docs(tmp_path / "eval.txt", docs[:3] + ["A fresh evaluation document."])
    dm = CalibrationDataModule(domain=TextSource(path=calibration), eval_domain=TextSource(path=evaluation))
    with pytest.raises(ValueError) as err:
        dm.setup()
    message = str(err.value)
    for part in ("domain evaluation text", evaluation, "3 of its 4 documents (75.0%)", "domain calibration text",
                 calibration, "disjoint files", "allow_overlap=True"):
        assert part in message


def test_allow_overlap_turns_the_error_into_a_warning(tmp_path, caplog):
    docs = [f"Document number {i} about a topic." for i in range(10)]
    calibration = write_docs(tmp_path / "cal.txt", docs)
    dm = CalibrationDataModule(general=TextSource(path=calibration), eval_general=TextSource(path=calibration),
                               allow_overlap=True)
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning.data"):
        dm.setup()
    assert any("10 of its 10 documents (100.0%)" in r.getMessage() for r in caplog.records)
    assert dm.eval_names == ("general",)


# --- 3. file encoding ----------------------------------------------------------------------------


def test_undecodable_file_names_the_offset_and_the_encoding_option(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("Caf\u00e9 au lait.\n\nSecond paragraph.".encode("latin-1"))
    dm = CalibrationDataModule(domain=TextSource(path=str(path)))
    with pytest.raises(ValueError) as err:
        dm.setup()
    message = str(err.value)
    for part in (str(path), "not valid utf-8", "byte offset 3", "encoding: latin-1", "data.domain.encoding"):
        assert part in message
    assert load_documents(TextSource(path=str(path), encoding="latin-1")) == ["Caf\u00e9 au lait.", "Second paragraph."]


def test_unknown_encoding_name_is_refused():
    with pytest.raises(ValueError, match="unknown text encoding 'utf-9'"):
        TextSource(path="x.txt", encoding="utf-9")


def test_encoding_applies_to_jsonl_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes('{"text": "na\u00efve"}\n'.encode("cp1252"))
    assert load_records(TextSource(path=str(path), encoding="cp1252")) == [{"text": "na\u00efve"}]


# --- 4. malformed jsonl --------------------------------------------------------------------------


def test_malformed_jsonl_names_the_line_of_the_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_documents(TextSource(path=str(path)))
    message = str(err.value)
    assert f"{path}, line 4: not valid JSON" in message and "Unterminated string" in message


def test_jsonl_line_holding_an_array_is_refused(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "one"}\n["not", "a record"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: holds an array, not a JSON object"):
        load_records(TextSource(path=str(path)))


def test_jsonl_record_with_a_line_separator_character_stays_one_record(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + '{"text": "c"}\n', encoding="utf-8")
    assert load_documents(TextSource(path=str(path))) == ["a\u2028b", "c"]


# --- 5. seq_len against the model's positions ----------------------------------------------------


@pytest.mark.parametrize("family,key", [("llama", "max_position_embeddings"), ("gpt2", "n_positions")])
def test_seq_len_longer_than_the_positions_is_refused(family, key):
    spec = tiny_spec(family)
    assert max_positions(spec) == 256
    check_seq_len(spec, 256)
    with pytest.raises(ValueError, match=rf"seq_len 512 exceeds the model's maximum positions 256 \({key}\): "
                                         r"use data.seq_len <= 256"):
        check_seq_len(spec, 512)


def test_max_positions_reads_only_the_config_of_a_local_folder(tmp_path, offline):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()  # no weights: only config.json can be read
    spec = ModelSpec(name_or_path=str(tmp_path / "m"), config_overrides={"max_position_embeddings": 64})
    assert max_positions(spec) == 64  # overrides apply as they do at load
    assert max_positions(tiny_spec("bloom")) is None  # ALiBi: no position table


# --- 6. local paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./my_model", "runs/one/two", "my_model.safetensors", "models/new"])
def test_local_looking_missing_model_is_reported_before_any_hub_call(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # "models/new": its parent folder exists here, so a local folder was meant
    with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
        check_model_source(ModelSpec(name_or_path=name))


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-2-7b-hf", "Qwen/Qwen2.5-0.5B", "smollm2-135m"])
def test_hub_ids_and_aliases_are_left_to_the_loader(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_model_source(ModelSpec(name_or_path=name))


def test_missing_tokenizer_folder_is_reported(tmp_path, monkeypatch):
    from dpruner_lightning.models import load_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer folder ./tok does not exist"):
        load_tokenizer(ModelSpec(name_or_path="random:llama", tokenizer="./tok"))


def test_relative_path_without_dot_slash_is_loaded_locally(tmp_path, monkeypatch, offline):
    tiny_model("llama").save_pretrained(tmp_path / "my_model")
    monkeypatch.chdir(tmp_path)
    model = load_causal_lm(ModelSpec(name_or_path="my_model"))
    assert model.config.hidden_size == TINY["llama"]["hidden_size"]


def test_truncated_weights_name_the_file(tmp_path, offline):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError) as err:
        load_causal_lm(ModelSpec(name_or_path=str(tmp_path / "m")))
    assert f"{weights} is truncated or corrupt" in str(err.value) and "copy or download it again" in str(err.value)


# --- 7. checksums of the demo cache --------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPRUNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_download_wheel", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.setattr(assets, "_VERIFIED", {})
    return tmp_path / "cache"


def cached_model(cache):
    folder = cache / "models" / "smollm2-135m"
    tiny_model("llama").save_pretrained(folder)
    return folder


def test_cached_model_folder_without_weights_is_not_valid(cache):
    folder = cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(assets.AssetError, match=f"incomplete.*Remove the cache entry {folder} and rerun"):
        assets.resolve_model("smollm2-135m")


def test_cached_model_folder_checksums_are_recorded_and_verified(cache):
    folder = cached_model(cache)
    assert assets.resolve_model("smollm2-135m") == str(folder)  # an entry from before checksums: adopted
    assert "model.safetensors" in json.loads((folder / assets._MANIFEST).read_text())
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(assets.AssetError) as err:
        assets.resolve_model("smollm2-135m")
    assert f"{weights} does not match its recorded sha256" in str(err.value)
    assert f"Remove the cache entry {folder} and rerun (it is rebuilt" in str(err.value)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(assets.AssetError, match="missing or truncated"):
        assets.resolve_model("smollm2-135m")


def test_truncated_cached_model_without_checksums_is_refused(cache):
    weights = cached_model(cache) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(assets.AssetError, match=f"{weights} is truncated or corrupt.*Remove the cache entry"):
        assets.resolve_model("smollm2-135m")


def test_cached_corpus_is_checked_against_its_recorded_sha256(cache):
    entry = cache / "corpora" / f"pubmed-v{assets._CORPUS_FORMAT}.jsonl"
    entry.parent.mkdir(parents=True)
    entry.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("first abstract", "second")), encoding="utf-8")
    assert assets.sample_corpus("pubmed") == ["first abstract", "second"]  # from before checksums: recorded now
    sidecar = cache / "checksums" / "corpora" / (entry.name + ".sha256")
    assert sidecar.read_text().strip() == assets.hashlib.sha256(entry.read_bytes()).hexdigest()
    entry.write_text(json.dumps({"text": "first abstract"}) + "\n", encoding="utf-8")  # truncated
    with pytest.raises(assets.AssetError) as err:
        assets.sample_corpus("pubmed")
    assert f"does not match the sha256 recorded in {sidecar}" in str(err.value)
    assert f"Remove the cache entry {entry} and rerun" in str(err.value)


# --- 8. targets ----------------------------------------------------------------------------------


def test_target_excluded_by_the_default_shows_the_effective_pattern():
    with pytest.raises(ValueError) as err:
        find_targets(tiny_model("llama"), target_modules="lm_head")
    message = str(err.value)
    assert f"exclude_modules=None, i.e. the default {DEFAULT_EXCLUDE!r}" in message
    assert "It selects lm_head, but all of them are excluded" in message and "matches no linear layer" in message


def test_explicit_targets_cut_by_the_default_exclude_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning.algorithms.targets"):
        targets = find_targets(tiny_model("llama"), target_modules=r".*(down_proj|lm_head)")
    assert "lm_head" not in targets and len(targets) == 2
    assert any("lm_head" in r.getMessage() and DEFAULT_EXCLUDE in r.getMessage() for r in caplog.records)


def test_tied_lm_head_is_refused_with_the_embedding_it_would_zero():
    with pytest.raises(ValueError) as err:
        find_targets(tiny_model("gpt2"), target_modules="lm_head", exclude_modules="$^")
    message = str(err.value)
    assert "target 'lm_head' shares its weight with transformer.wte.weight" in message
    assert "pruning it also zeroes the embedding transformer.wte.weight" in message
    assert "config_overrides: {tie_word_embeddings: false}" in message


def test_untied_lm_head_can_be_targeted():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", tie_word_embeddings=False, **TINY["gpt2"]))
    assert list(find_targets(model, target_modules="lm_head", exclude_modules="$^")) == ["lm_head"]
