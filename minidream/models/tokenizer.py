"""The CLIP byte-level BPE tokenizer, as OpenAI's CLIP tokenizes prompts for Stable Diffusion 1.x.

Text is repaired (ftfy), HTML-unescaped twice, whitespace-collapsed and lower-cased, split by
CLIP's regex into words, numbers (one digit each) and punctuation runs; each piece's UTF-8 bytes
are mapped to printable characters and merged by byte-pair encoding (Sennrich et al. 2016) into
vocabulary entries. A prompt becomes BOS, ids, EOS, padding: 77 ids for SD 1.x.
"""

import gzip
import html
import importlib.resources
import json
import warnings
from pathlib import Path
from typing import Sequence

import ftfy
import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"  # suffix marking the last symbol of a word, so "a</w>" and "a" differ
BUNDLED_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The bundled file lists 262k merges; CLIP uses the first 48,894 so that its vocabulary is
# 2 x 256 byte symbols (plain and word-final) + 48,894 merges + BOS + EOS = 49,408 ids.
NUM_CLIP_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace.
CLIP_SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) to
    chr(256 + n), so every byte string becomes a string BPE can merge without whitespace.
    The order of this dict is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def clean_text(text: str) -> str:
    """CLIP's text normalisation: repair mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def bundled_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of OpenAI's CLIP, from the file shipped in `minidream/data/`."""
    resource = importlib.resources.files("minidream").joinpath("assets", BUNDLED_MERGES_FILE)
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        text = lines.read()
    # Line 0 is a version header; each following line is one merge "left right".
    merges = [tuple(line.split()) for line in text.split("\n")[1 : 1 + NUM_CLIP_MERGES]]
    byte_symbols = list(BYTE_TO_UNICODE.values())
    entries = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges]
    entries += [BOS_TOKEN, EOS_TOKEN]
    return {entry: i for i, entry in enumerate(entries)}, merges


class CLIPTokenizer:
    """Prompts to CLIP token ids: `tokenizer(prompts)` -> B x context_length LongTensor.

    `CLIPTokenizer()` uses the bundled vocabulary; `CLIPTokenizer.from_folder(path)` reads a
    diffusers/transformers `tokenizer/` folder. SD 1.x pads with EOS (the default pad id).
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        context_length: int = 77,
        pad_token_id: int | None = None,
    ):
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither for the bundled CLIP vocabulary")
        if vocab is None:
            vocab, merges = bundled_vocabulary()
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.id_to_token = {i: token for token, i in self.vocab.items()}
        self.merge_ranks = {merge: rank for rank, merge in enumerate(self.merges)}
        self.bos_token_id = self.vocab[BOS_TOKEN]
        self.eos_token_id = self.vocab[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
        self.context_length = context_length
        # Pre-token -> its BPE symbols. Prompts repeat the same few words, so this is most of
        # the speed. Special tokens are "already merged": they map to themselves.
        self._bpe_cache: dict[str, list[str]] = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}
        self._truncation_warned = False

    @classmethod
    def from_folder(
        cls, folder: str | Path, context_length: int = 77, pad_token_id: int | None = None
    ) -> "CLIPTokenizer":
        """Read a diffusers/transformers `tokenizer/` folder.

        SD 1.x releases hold `vocab.json` + `merges.txt`; newer transformers write only
        `tokenizer.json`. The pad token comes from `special_tokens_map.json` or
        `tokenizer_config.json` when present (SD 2.x pads with "!"), unless `pad_token_id` is given.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = _read_merges_txt(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise FileNotFoundError(f"{folder} holds neither vocab.json + merges.txt nor tokenizer.json")
        if pad_token_id is None:
            pad_token = _read_pad_token(folder)
            pad_token_id = None if pad_token is None else vocab[pad_token]
        return cls(vocab, merges, context_length, pad_token_id)

    def save_folder(self, folder: str | Path) -> None:
        """Write a `tokenizer/` folder that diffusers and `transformers.CLIPTokenizer` load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        # transformers' original CLIP tokenizer skips the first line of merges.txt as a header.
        merges_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in self.merges]
        (folder / "merges.txt").write_text("\n".join(merges_lines) + "\n", encoding="utf-8")
        special_tokens = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": self.id_to_token[self.pad_token_id],
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
            **special_tokens,
        }
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without BOS/EOS and without truncation."""
        ids = []
        for piece in CLIP_SPLIT_PATTERN.findall(clean_text(text)):
            symbols = self._bpe("".join(BYTE_TO_UNICODE[b] for b in piece.encode("utf-8")))
            ids.extend(self.vocab[symbol] for symbol in symbols)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The (cleaned, lower-cased) text of some token ids, for inspecting what a prompt became."""
        symbols = "".join(self.id_to_token[int(i)] for i in ids)
        text = bytes(UNICODE_TO_BYTE[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """B x context_length ids: BOS, prompt ids, EOS, then padding; too long prompts keep EOS last."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = torch.full((len(prompts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, prompt in zip(rows, prompts):
            ids = [self.bos_token_id, *self.encode(prompt), self.eos_token_id]
            if len(ids) > self.context_length:
                self._warn_truncation(prompt, len(ids) - self.context_length)
                ids = ids[: self.context_length - 1] + [self.eos_token_id]
            row[: len(ids)] = torch.tensor(ids)
        return rows

    def _bpe(self, word: str) -> list[str]:
        """Split one pre-token (in byte characters) into vocabulary entries by greedy BPE merges.

        Repeatedly merges every occurrence of the adjacent pair that was learned first (lowest
        rank), until no adjacent pair is a known merge.
        """
        if word in self._bpe_cache:
            return self._bpe_cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._bpe_cache[word] = symbols
        return symbols

    def _warn_truncation(self, prompt: str, dropped: int) -> None:
        if self._truncation_warned:
            return
        self._truncation_warned = True
        warnings.warn(
            f"prompt truncated to {self.context_length} tokens, {dropped} tokens dropped: {prompt[:60]!r}... "
            "(later truncations are not reported)",
            stacklevel=3,
        )


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: expected a BPE tokenizer model, found {model.get('type')!r}")
    # tokenizers < 0.20 writes merges as "left right" strings, newer versions as [left, right] pairs.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _read_pad_token(folder: Path) -> str | None:
    """The pad token named in a transformers tokenizer folder, if any (a string or {"content": ...})."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return None
