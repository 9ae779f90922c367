"""SD 2.x's tokenization: the bundled CLIP vocabulary padded with id 0 ("!").

References: transformers' CLIPTokenizer loaded as stabilityai/stable-diffusion-2-1's tokenizer/
folder has it (pad_token "!"), and open_clip's tokenizer, which SD 2.x's original code
(`FrozenOpenCLIPEmbedder`: `open_clip.tokenize`) calls and which zero-fills.
"""

import warnings

import torch
import transformers
from test_tokenizer import corpus, is_clean, open_clip_tokenizer, transformers_ids  # noqa: F401 (fixtures)

from minidream.config import SD15, SD21, SD21_BASE, TINY_SD2
from minidream.models.pipeline import default_tokenizer, random_pipeline


def test_sd2_pads_with_exclamation_mark():
    for config in (SD21, SD21_BASE, TINY_SD2):
        tokenizer = default_tokenizer(config.text_encoder)
        assert tokenizer.pad_token_id == 0 and tokenizer.id_to_token[0] == "!"
        assert tokenizer("a cat")[0, :6].tolist() == [49406, 320, 2368, 49407, 0, 0]
    assert default_tokenizer(SD15.text_encoder).pad_token_id == 49407  # SD 1.x: EOS, unchanged
    assert random_pipeline(TINY_SD2).tokenizer.pad_token_id == 0


def test_ids_equal_sd2_tokenizer_folder(corpus, tmp_path):  # noqa: F811
    # SD 2's tokenizer folder: vocab.json + merges.txt as SD 1's, pad_token "!" in special_tokens_map.json.
    ours = default_tokenizer(SD21.text_encoder)
    ours.save_folder(tmp_path)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert reference.pad_token == "!" and reference.pad_token_id == 0
    # Prompts with "!" are left out: see test_exclamation_marks_follow_open_clip.
    clean = [p for p in corpus if is_clean(p) and "!" not in p]
    assert len(clean) >= 400
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(clean), transformers_ids(reference, clean))


def test_ids_equal_open_clip_tokenize(corpus, open_clip_tokenizer):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = default_tokenizer(SD21.text_encoder)(corpus)
    assert torch.equal(ids, open_clip_tokenizer(corpus))
    assert (ids == 0).sum() > 1000  # padding was compared, not only prompt ids


def test_exclamation_marks_follow_open_clip(open_clip_tokenizer, tmp_path):  # noqa: F811
    # Where the references part: transformers makes the pad token "!" a special token, so SD 2's
    # diffusers tokenizer never merges "!" with its neighbours; SD 2.x's own code (open_clip)
    # merges as for any other text. minidream tokenizes as SD 2.x was trained, like open_clip.
    ours = default_tokenizer(SD21.text_encoder)
    ours.save_folder(tmp_path)
    diffusers_style = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ours("wow!!!")[0, :4].tolist() == open_clip_tokenizer(["wow!!!"])[0, :4].tolist() == [49406, 2781, 995, 49407]
    assert diffusers_style("wow!!!").input_ids == [49406, 2781, 0, 0, 0, 49407]
