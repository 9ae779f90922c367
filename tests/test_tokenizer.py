"""The CLIP tokenizer gives the reference token ids.

Two references: open_clip's copy of OpenAI's original tokenizer (`open_clip/tokenizer.py`, loaded
by file path because the package's __init__ needs torchvision), which does the whole CLIP text
clean-up; and transformers' `CLIPTokenizer`, which skips ftfy and HTML unescaping and so is
compared only on text those steps leave unchanged.
"""

import gzip
import hashlib
import html
import importlib.util
import json
import warnings
from pathlib import Path

import ftfy
import pytest
import regex
import torch
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minidream.models.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, clean_text

CORPUS_PATH = Path(__file__).parent / "data" / "prompts.json"
OPEN_CLIP_DIR = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
# open_clip names the special tokens differently from OpenAI/transformers; text that spells out
# either pair is where the two references disagree, so the open_clip comparison leaves it out.
SPECIAL_TOKEN_TEXTS = (BOS_TOKEN, EOS_TOKEN, "<start_of_text>", "<end_of_text>")

# Prompt-like characters (so that words, contractions, entities and weights occur), mixed with
# any Unicode character except lone surrogates, which are not encodable text.
PROMPT_LIKE = "abcdefghijklmnopqrstuvwxyz ABCXYZ'()[]{}<>|:;,.!?&#0123456789_-\n\t"
PROMPT_CHARS = st.one_of(st.sampled_from(PROMPT_LIKE), st.characters(blacklist_categories=("Cs",)))
# For transformers also no unassigned code points ("Cn"): the `regex` module and transformers'
# Rust regex engine carry different Unicode versions and disagree on whether e.g. U+3D000 is a letter.
ASSIGNED_PROMPT_CHARS = st.one_of(st.sampled_from(PROMPT_LIKE), st.characters(blacklist_categories=("Cs", "Cn")))


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", OPEN_CLIP_DIR / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._tokenizer  # SimpleTokenizer over open_clip's own bundled vocabulary


@pytest.fixture(scope="module")
def transformers_tokenizer(open_clip_tokenizer, tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json + merges.txt made from open_clip's tables (not ours)."""
    folder = tmp_path_factory.mktemp("reference_tokenizer")
    renamed = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
    vocab = {renamed.get(token, token): i for token, i in open_clip_tokenizer.encoder.items()}
    merges = sorted(open_clip_tokenizer.bpe_ranks, key=open_clip_tokenizer.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges), encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def corpus():
    return json.loads(CORPUS_PATH.read_text(encoding="utf-8"))


def is_clean(text: str) -> bool:
    """True where CLIP's ftfy + HTML steps change nothing, i.e. where transformers must agree."""
    return ftfy.fix_text(html.unescape(html.unescape(text))) == text


def transformers_ids(hf_tokenizer, prompts: list[str]) -> torch.Tensor:
    return hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_bundled_vocabulary_is_open_clips(tokenizer, open_clip_tokenizer):
    ours = Path(__file__).parents[1] / "minidream" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    theirs = OPEN_CLIP_DIR / "bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.sha256(ours.read_bytes()).digest() == hashlib.sha256(theirs.read_bytes()).digest()
    assert gzip.open(ours).readline().startswith(b'"bpe_simple_vocab_16e6.txt#version')
    renamed = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
    assert tokenizer.vocab == {renamed.get(t, t): i for t, i in open_clip_tokenizer.encoder.items()}
    assert (len(tokenizer.vocab), tokenizer.bos_token_id, tokenizer.eos_token_id) == (49408, 49406, 49407)


def test_corpus_covers_the_hard_cases(tokenizer, corpus):
    def count(pattern: str) -> int:
        return sum(bool(regex.search(pattern, p)) for p in corpus)

    assert len(corpus) >= 500
    assert count(r"\p{Han}|\p{Hiragana}|\p{Hangul}") >= 20
    assert count(r"\p{Extended_Pictographic}") >= 15
    assert count(r"[àáâäãåçéèêëíïñóöôúüßøæœ]") >= 20
    assert count(r"&[a-z#0-9]+;") >= 15
    assert count(r"Ã|â€|Ð") >= 10  # UTF-8 read as Windows-1252 / Latin-1
    assert count(r"  |\n|\t") >= 20
    assert count(r"\(\w[\w ]*:\d\.\d\)") >= 5 and count(r"\[\w+\|\w+\]") >= 1
    assert count(r"\bsks\b") >= 10
    assert count(r"\d") >= 30
    assert sum(len(tokenizer.encode(p)) > 75 for p in corpus) >= 40  # truncated by the 77-token context


def test_corpus_matches_open_clip(tokenizer, open_clip_tokenizer, corpus):
    assert not [p for p in corpus if any(s in clean_text(p) for s in SPECIAL_TOKEN_TEXTS)]
    for prompt in corpus:
        assert tokenizer.encode(prompt) == open_clip_tokenizer.encode(prompt), prompt
    # The padded batch too; open_clip pads with 0, so ours is asked to as well.
    zero_padded = CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(zero_padded(corpus), open_clip_tokenizer(corpus))


def test_clean_corpus_matches_transformers(tokenizer, transformers_tokenizer, corpus):
    clean = [p for p in corpus if is_clean(p)]
    assert len(clean) >= 400
    for prompt in clean:
        assert tokenizer.encode(prompt) == transformers_tokenizer(prompt, add_special_tokens=False).input_ids, prompt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(tokenizer(clean), transformers_ids(transformers_tokenizer, clean))


@settings(max_examples=2000, deadline=None)
@given(st.text(PROMPT_CHARS, max_size=80))
def test_any_text_matches_open_clip(tokenizer, open_clip_tokenizer, text):
    assume(not any(s in clean_text(text) for s in SPECIAL_TOKEN_TEXTS))
    assert tokenizer.encode(text) == open_clip_tokenizer.encode(text)


@settings(max_examples=2000, deadline=None)
@given(st.text(ASSIGNED_PROMPT_CHARS, max_size=80))
def test_any_clean_text_matches_transformers(tokenizer, open_clip_tokenizer, transformers_tokenizer, text):
    assume(is_clean(text))
    # CLIP's split pattern is case-insensitive, so a combining mark that folds to a letter (U+0345
    # folds to iota) matches none of its branches and is dropped, by open_clip and minidream alike;
    # transformers' tokenizer keeps it. Such characters are the reference's to explain, not ours.
    assume(all(c.isspace() or open_clip_tokenizer.pat.findall(c) for c in text))
    assert tokenizer.encode(text) == transformers_tokenizer(text, add_special_tokens=False).input_ids


def test_special_token_text_becomes_the_special_id(tokenizer, transformers_tokenizer):
    # As in OpenAI's CLIP and transformers (open_clip spells its special tokens differently).
    prompt = "a photo <|endoftext|> of <|startoftext|> a dog"
    assert tokenizer.encode(prompt) == transformers_tokenizer(prompt, add_special_tokens=False).input_ids
    assert tokenizer.encode(prompt)[2] == 49407


def test_truncation_keeps_eos_last_and_warns_once_with_the_count(tokenizer):
    quiet = CLIPTokenizer(tokenizer.vocab, tokenizer.merges)  # a fresh one that has not warned yet
    long_prompt = " ".join(["dog"] * 100)  # "dog" is one token: 102 ids with BOS/EOS
    with pytest.warns(UserWarning, match="25 tokens dropped"):
        ids = quiet([long_prompt, "a cat"])
    assert ids[0].tolist() == [49406] + [1929] * 75 + [49407]
    assert ids[1].tolist() == [49406, 320, 2368] + [49407] * 74
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet([long_prompt + " again"])


def test_padding_id_is_configurable(tokenizer):
    ids = CLIPTokenizer(tokenizer.vocab, tokenizer.merges, context_length=8, pad_token_id=0)(["a cat", ""])
    assert ids.tolist() == [[49406, 320, 2368, 49407, 0, 0, 0, 0], [49406, 49407, 0, 0, 0, 0, 0, 0]]
    assert tokenizer("a cat").tolist() == [[49406, 320, 2368] + [49407] * 74]


def test_decode_gives_back_the_cleaned_text(tokenizer):
    assert tokenizer.decode(tokenizer.encode("A  PHOTO of\nSKS dog &amp; café")) == "a photo of sks dog & café"


def test_saved_folder_loads_in_transformers_with_the_same_ids(tokenizer, corpus, tmp_path):
    tokenizer.save_folder(tmp_path)
    loaded = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    clean = [p for p in corpus if is_clean(p)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(transformers_ids(loaded, clean), tokenizer(clean))
    assert (loaded.model_max_length, loaded.pad_token_id) == (77, 49407)


def test_reads_vocab_merges_folder_and_tokenizer_json_folder(tokenizer, transformers_tokenizer, corpus, tmp_path):
    transformers_tokenizer.save_pretrained(tmp_path / "json_only")
    for leftover in ("vocab.json", "merges.txt"):  # transformers 5 writes none; older versions did
        (tmp_path / "json_only" / leftover).unlink(missing_ok=True)
    tokenizer.save_folder(tmp_path / "vocab_merges")
    for name in ("json_only", "vocab_merges"):
        loaded = CLIPTokenizer.from_folder(tmp_path / name)
        assert (loaded.vocab, loaded.merges, loaded.pad_token_id) == (tokenizer.vocab, tokenizer.merges, 49407)
        assert [loaded.encode(p) for p in corpus] == [tokenizer.encode(p) for p in corpus]


def test_folder_pad_token_is_read(tokenizer, tmp_path):
    # SD 2.x's tokenizer folder pads with "!" (id 0), given as an AddedToken-style dict.
    tokenizer.save_folder(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 0
    assert CLIPTokenizer.from_folder(tmp_path, pad_token_id=49407).pad_token_id == 49407


def test_missing_folder_or_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found: .*nowhere") as missing:
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither vocab.json \\+ merges.txt nor tokenizer.json") as empty:
        CLIPTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(empty.value)
    assert "\n" not in str(missing.value) + str(empty.value)
