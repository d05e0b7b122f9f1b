"""Make a tiny, randomly initialised Llama and its tokenizer, saved in Hugging Face format.

Run with the vLLM virtualenv's Python (it needs torch, transformers and
tokenizers): ``python tools/tiny_model.py OUTPUT_DIR``. There is no model hub
on the machines this project is tested on, so the real-vLLM tests serve a
model made here in a few seconds. Its answers are gibberish, but everything
vLLM says about them (chunks, usage, errors, metrics) has its real shape.

Heads are 32 wide: vLLM's CPU attention wants a head width divisible by 32
(or 16). The model is not as small as it could be on purpose (see HIDDEN).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 1024
HIDDEN, LAYERS = 1024, 4
"""About 50 M parameters (200 MB): still made in seconds, but each token costs the engine a few
milliseconds, so vLLM's API server, which handles every token in Python, is not swamped by hundreds
of tokens a second on a small machine."""
MAX_POSITIONS = 8192
"""Long enough for a request to hold vLLM's only slot for many seconds (the tests need that)."""
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TEXT = (
    "queue model token answer request priority broker consumer sender stream chunk usage "
    "server client dispatch wait serve first last high low fast slow small large text word "
    "the a of to and in is it that for on with as at by from this be are was or an not"
)
_WORDS = _TEXT.split()


def training_text(lines: int = 400, seed: int = 7) -> list[str]:
    """A few KB of made-up sentences: the tokenizer only needs bytes to merge."""
    rng = random.Random(seed)
    text = []
    for number in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 12))
        text.append(f"{' '.join(words).capitalize()} {number}, {rng.randint(0, 9999)}.")
    return text


def build_tokenizer(output: Path) -> int:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(training_text(), vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, PAD])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(output))
    return len(tokenizer)


def build_model(output: Path, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokens = json.loads((output / "tokenizer.json").read_text())["added_tokens"]
    ids = {entry["content"]: entry["id"] for entry in tokens}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 32,
        num_key_value_heads=HIDDEN // 32,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(output))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/tiny_model.py OUTPUT_DIR")
    output = Path(sys.argv[1])
    output.mkdir(parents=True, exist_ok=True)
    build_model(output, build_tokenizer(output))
    print(f"tiny model written to {output}")


if __name__ == "__main__":
    main()
