"""Tokenizer loading, chat templates and thinking-token discovery."""

from __future__ import annotations

import json

import pytest

from nemojax.tokenizer import Tokenizer, TokenizerError, for_checkpoint, from_file

VOCAB = {"<unk>": 0, "<think>": 1, "</think>": 2, "\n": 3, "a": 4, "b": 5, " ": 6, "<|im_start|>": 7,
         "<|im_end|>": 8, "b\n": 9, "u": 10, "s": 11, "e": 12, "r": 13, "t": 14}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>a\n{% if enable_thinking %}<think>\n{% endif %}{% endif %}")


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>|</?think>|b\n|\n|."),
                                             behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))
    return tmp_path


def test_tokenizer_json_with_chat_template(tokenizer_dir):
    tok = from_file(str(tokenizer_dir))
    assert tok.encode("ab") == [4, 5] and tok.decode([4, 5, 3]) == "ab\n"
    assert tok.chat("ab") == "<|im_start|>user\nab<|im_end|>\n<|im_start|>a\n<think>\n"
    assert tok.chat("ab", enable_thinking=False).endswith("<|im_start|>a\n")
    thinking = tok.thinking_tokens()
    assert (thinking.start, thinking.end) == (1, 2)
    assert thinking.newlines == (3, 9)  # every token whose text holds a newline


def test_bytes_tokenizer():
    tok = Tokenizer()
    assert tok.encode("é\n") == [195, 169, 10] and tok.decode([195, 169, 10]) == "é\n"
    assert tok.thinking_tokens() is None and tok.chat_template is None


def test_which_tokenizer_a_checkpoint_gets(tokenizer_dir, tmp_path):
    assert for_checkpoint(str(tokenizer_dir), None, None).name.endswith("tokenizer.json")
    converted = tmp_path / "converted"
    (converted / "assets").mkdir(parents=True)
    (converted / "assets" / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    assert for_checkpoint(str(converted), None, None).encode("ab") == [4, 5]
    bare = tmp_path / "bare"
    bare.mkdir()
    assert for_checkpoint(str(bare), None, {"data": {"source": "synthetic"}}).name == "bytes"
    assert for_checkpoint(str(bare), None, {"data": {"source": "text", "tokenizer": str(tokenizer_dir)}}).encode(
        "ab") == [4, 5]
    assert for_checkpoint(str(bare), "bytes", None).name == "bytes"
    with pytest.raises(TokenizerError, match=r"has no tokenizer \(looked for .*bare/tokenizer.json"):
        for_checkpoint(str(bare), None, None)
    with pytest.raises(TokenizerError, match="no such file"):
        for_checkpoint(str(bare), str(bare / "missing.json"), None)
