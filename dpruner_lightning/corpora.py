"""Turn the raw demo sources into plain-text documents.

Pure text functions with no network or cache logic (that lives in :mod:`dpruner_lightning.assets`),
so each one can be tested on a hand-written snippet:

* :func:`strip_wiki_markup` / :func:`iter_wikipedia_articles`: MediaWiki XML dump -> article text;
* :func:`iter_pubmed_abstracts`: PubMed/MEDLINE XML -> "title\\n\\nabstract";
* :func:`iter_pubmed_records` / :func:`clean_pubmed_records`: the same XML -> ``{"title", "abstract"}``;
* :func:`strip_yaml_header`: ScanCode ``*.LICENSE`` file -> licence text;
* :func:`clean_documents`: drop short documents and exact duplicates;
* :func:`decode_file` / :func:`jsonl_records`: a user's local text file -> text -> records, with
  errors that name the file, the byte offset or line, and the fix;
* :func:`document_hash`: the identity of a document for the calibration / evaluation overlap checks.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

MIN_DOC_CHARS = 200
"""Documents shorter than this (after cleaning) are dropped: stubs, lists, redirects."""

# --- Wikipedia ----------------------------------------------------------------------------------

# Sections that hold only citations and link lists: prose-free, so they are dropped whole.
_TAIL_SECTIONS = {
    "see also", "references", "notes", "footnotes", "external links", "further reading",
    "bibliography", "sources", "citations", "notes and references",
}
# Tags whose *content* is not prose (citations, formulas, galleries, code).
_DROP_TAGS = "ref|math|chem|gallery|timeline|score|syntaxhighlight|source|imagemap|graph"
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_SELF_CLOSING = re.compile(rf"<(?:{_DROP_TAGS}|references)\b[^>]*/\s*>", re.I)
_PAIRED = re.compile(rf"<({_DROP_TAGS}|references)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}: applied until nothing matches
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost {| ... |}
# Links into non-prose namespaces, and interlanguage links such as [[de:Anarchismus]].
# Language codes are matched lower-case only, so that "[[War: A History]]" stays a normal link.
_NS_LINK = re.compile(
    r"\[\[\s*(?:(?i:file|image|media|category)|[a-z]{2,3}(?:-[a-z]+)?)\s*:[^\[\]]*\]\]"
)
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.M)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")


def _sub_until_stable(pattern: re.Pattern[str], repl: str, text: str) -> str:
    """Apply ``pattern`` repeatedly: nested constructs are removed innermost first."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    target, label = match.group(1), match.group(2)
    if label is None:  # [[target]] shows the target
        return target
    if label.strip():  # [[target|label]] shows the label
        return label
    return re.sub(r"\s*\([^()]*\)\s*$", "", target)  # "pipe trick": [[Foo (bar)|]] shows "Foo"


def _drop_tail_sections(text: str) -> str:
    """Remove 'References', 'External links', ... sections up to the next kept heading."""
    parts = _HEADING.split(text)  # [body, level, title, body, level, title, body, ...]
    kept, dropping_level = [parts[0]], 0
    for i in range(1, len(parts), 3):
        level, title, body = len(parts[i]), parts[i + 1], parts[i + 2]
        if dropping_level and level > dropping_level:
            continue  # a subsection of a dropped section
        dropping_level = level if title.strip(" '").lower() in _TAIL_SECTIONS else 0
        if not dropping_level:
            kept.append(f"\n{title}\n{body}")
    return "".join(kept)


def strip_wiki_markup(text: str) -> str:
    """Reduce MediaWiki source to readable plain text.

    Removes comments, citations (``<ref>``) and other non-prose tags, templates ``{{...}}``,
    tables ``{|...|}``, files, categories and interlanguage links; turns ``[[target|text]]`` into
    ``text`` and ``[url text]`` into ``text``; drops bold/italic quotes, heading markers (keeping
    the heading text on its own line), list markers, the trailing reference/link sections, and
    HTML tags and entities. It is a heuristic cleaner for calibration text, not a full parser.
    """
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _PAIRED.sub("", text)
    text = _sub_until_stable(_TEMPLATE, "", text)
    text = _sub_until_stable(_TABLE, "", text)
    # Links: captions of [[File:...|...[[a link]]...]] contain links, so resolve innermost first.
    while True:
        new = _LINK.sub(_link_text, _NS_LINK.sub("", text))
        if new == text:
            break
        text = new
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold''', '''''both'''''
    text = _drop_tail_sections(text)
    text = _TAG.sub("", text)  # <br>, <small>, <sup>, <div ...>, <nowiki>: keep their content
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"__[A-Z]+__", "", line)  # magic words such as __NOTOC__
        if re.match(r"\s*(?:[|!]|-{4,})", line):
            continue  # leftover table rows and horizontal rules
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indentation markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # brackets emptied by template removal
        line = re.sub(r"[ \t]+", " ", line).strip()
        line = re.sub(r" ([,.;:])", r"\1", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
    """Tag name without its XML namespace ('{ns}page' -> 'page')."""
    return tag.rsplit("}", 1)[-1]


def iter_wikipedia_articles(stream: IO[bytes]) -> Iterator[str]:
    """Yield the cleaned text of each main-namespace, non-redirect page of a MediaWiki dump."""
    for _, elem in ET.iterparse(stream, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in elem.iter()}
        namespace = fields.get("ns")
        raw = fields.get("text")
        if "redirect" not in fields and namespace is not None and namespace.text == "0":
            if raw is not None and raw.text:
                yield strip_wiki_markup(raw.text)
        elem.clear()  # the dump can be large: free each page once read


# --- PubMed -------------------------------------------------------------------------------------


def _element_text(elem: ET.Element) -> str:
    # itertext keeps the text inside inline markup such as <i>, <sup>, <sub>.
    return re.sub(r"\s+", " ", "".join(elem.itertext())).strip()


def _pubmed_articles(stream: IO[bytes]) -> Iterator[tuple[str, list[str]]]:
    """``(title, abstract sections)`` of each PubMed article that has an abstract (title may be "").

    Structured abstracts keep their section labels ("METHODS: ..."), one string per section.
    """
    for _, elem in ET.iterparse(stream, events=("end",)):
        if elem.tag not in ("PubmedArticle", "PubmedBookArticle"):
            continue
        title_elem = elem.find(".//ArticleTitle")
        if title_elem is None:
            title_elem = elem.find(".//BookTitle")
        sections = []
        for part in elem.iterfind(".//Abstract/AbstractText"):
            body = _element_text(part)
            label = part.get("Label")
            if body:
                sections.append(f"{label.strip()}: {body}" if label else body)
        if sections:
            yield (_element_text(title_elem) if title_elem is not None else ""), sections
        elem.clear()


def pubmed_document(title: str, abstract: str) -> str:
    """The text of one sample-corpus document: ``title + "\\n\\n" + abstract`` (just the abstract
    without a title). Title tasks rebuild it to recognise the documents a model was calibrated on."""
    return (title + "\n\n" if title else "") + abstract


def iter_pubmed_abstracts(stream: IO[bytes]) -> Iterator[str]:
    """Yield ``title + "\\n\\n" + abstract`` for each PubMed article that has an abstract.

    Structured abstracts keep their section labels ("METHODS: ..."), one section per line.
    """
    for title, sections in _pubmed_articles(stream):
        yield pubmed_document(title, "\n".join(sections))


def iter_pubmed_records(stream: IO[bytes]) -> Iterator[dict[str, str]]:
    """Yield ``{"title", "abstract"}`` for each PubMed article with an abstract (the same articles and
    abstract text as :func:`iter_pubmed_abstracts`, with the title kept apart for title tasks)."""
    for title, sections in _pubmed_articles(stream):
        yield {"title": title, "abstract": "\n".join(sections)}


def clean_pubmed_records(records: Iterable[dict[str, str]], min_chars: int = MIN_DOC_CHARS) -> list[dict[str, str]]:
    """Keep the records whose document survives :func:`clean_documents` (same length rule, first copy of
    a duplicate) and that have a title: the titled subset of the ``pubmed`` sample, in its order."""
    seen: set[str] = set()
    out = []
    for record in records:
        title, abstract = record["title"].strip(), record["abstract"].strip()
        doc = pubmed_document(title, abstract).strip()
        if len(doc) < min_chars or doc in seen:
            continue
        seen.add(doc)
        if title:
            out.append({"title": title, "abstract": abstract})
    return out


# --- Licences -----------------------------------------------------------------------------------

_YAML_HEADER = re.compile(r"\A\ufeff?---[ \t]*\r?\n.*?^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)


def strip_yaml_header(text: str) -> str:
    """Remove a leading YAML front-matter block (``---`` ... ``---``) and outer blank lines."""
    return _YAML_HEADER.sub("", text, count=1).strip()


# --- Common -------------------------------------------------------------------------------------


def clean_documents(docs: Iterable[str], min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Strip documents, drop those shorter than ``min_chars`` and exact duplicates (keep order).

    Duplicates are dropped so that a split by document can never put the same text on both sides.
    """
    seen: set[str] = set()
    out = []
    for doc in docs:
        doc = doc.strip()
        if len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def checked_texts(texts) -> list[str]:
    """``texts`` as a list, refusing what is not a list of strings."""
    # A bare string is iterable: without this check it would silently become one document per character.
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"texts must be a list of strings, got a {type(texts).__name__}: wrap it in a list "
                         "(texts=[text]) to make it one document")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"texts must be a list of strings, got a {type(texts).__name__}") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is a {type(text).__name__}, not a str: every item of texts must be "
                             "the text of one document (convert it with str(), or drop it)")
    return texts


def shared_documents(docs: Iterable[str], others: Iterable[str]) -> set[int]:
    """Indices of ``docs`` whose text (by :func:`document_hash`) is also one of ``others``."""
    seen = {document_hash(d) for d in others}
    return {i for i, d in enumerate(docs) if document_hash(d) in seen}


def document_hash(text: str) -> str:
    """Identity of a document for overlap checks: sha256 of its stripped text."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


# --- Local files ----------------------------------------------------------------------------------


def decode_file(path: Path, encoding: str = "utf-8", where: str = "data.<source>") -> str:
    """The file's text in ``encoding``, newlines normalised as text-mode reading does. ``where`` is the
    source's place in the YAML config, so the error can name the option to set."""
    data = Path(path).read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid {encoding} text: the byte 0x{data[err.start]:02x} at byte offset {err.start} "
            f"cannot be decoded ({err.reason}). Set the file's encoding on this source, e.g. `encoding: latin-1` "
            f"({where}.encoding in the YAML config, TextSource(encoding=...) in Python)"
        ) from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def jsonl_records(text: str, path: Path) -> list[dict]:
    """One JSON object per non-blank line of ``text`` (read from ``path``, which errors name)."""
    records = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 or \x85, on which splitlines() would
    # cut a record in two (and shift every line number after it).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            # Parsed one line at a time, err.lineno is always 1: report the line of the file instead.
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}). Each line "
                             "of a .jsonl file must hold one complete JSON object: fix or remove that line") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: holds {_JSON_KINDS.get(type(record), 'a value')}, not a JSON "
                             'object: each line of a .jsonl file must be one record such as {"text": "..."}')
        records.append(record)
    return records
