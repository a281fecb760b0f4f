"""Seeded tiny Qwen2-family models for tests and `--tiny` runs.

Real weights cannot be fetched at test time, so the tests run on a tiny target and a tiny
draft built from a config with a fixed seed. The draft is a perturbed copy of the target:
close enough that many drafted tokens are accepted, different enough that rejections and
corrections happen, which exercises both paths of the verifier.

Weights are drawn with a larger spread than the usual initialiser so that next-token
distributions are peaked: a near-uniform random model would put greedy decoding on float
ties, where batched and unbatched kernels legitimately disagree.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_VOCAB = 384
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|pad|>"]

# Enough mixed text (code and prose) for the byte-level BPE to learn common merges.
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import json\nwith open('data.json') as f:\n    data = json.load(f)\n",
    "class Sensor:\n    def read(self) -> float:\n        return self.value\n",
    "The quick brown fox jumps over the lazy dog.",
    "Edge boards draft tokens and the server verifies them in one batch.",
    "Temperature in the greenhouse is 21 degrees and humidity is 60 percent.",
    "Write a function that returns the sum of a list of numbers.",
    "MQTT is a lightweight publish and subscribe protocol for the internet of things.",
    "if value > threshold:\n    alarm.trigger()\nelse:\n    alarm.clear()\n",
]


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE trained deterministically on the built-in corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def write_tiny_models(out: Path, seed: int = 0, draft_noise: float = 0.05) -> tuple[Path, Path]:
    """Write `out/target` and `out/draft` checkpoints (with tokenizer); return their paths."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), eos_token=EOS_TOKEN, pad_token="<|pad|>"
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    generator = torch.Generator().manual_seed(seed)
    target = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in target.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * _spread(name))
        # Rare end-of-text keeps tiny generations long enough to test 64+ new tokens;
        # real models end on EOS, and that path is tested with explicit stop conditions.
        target.lm_head.weight[tokenizer.eos_token_id].mul_(0.1)
        target.lm_head.weight[tokenizer.pad_token_id].mul_(0.1)
    draft = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for (name, param), (_, source) in zip(draft.named_parameters(), target.named_parameters()):
            if param.dim() >= 2:
                noise = torch.randn(param.shape, generator=generator) * _spread(name) * draft_noise
                param.copy_(source + noise)
            else:
                param.copy_(source)
    paths = []
    for role, model in (("target", target), ("draft", draft)):
        path = out / role
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def _spread(name: str) -> float:
    """Embedding and output head wide (peaked distributions); inner layers moderate."""
    if "embed_tokens" in name or "lm_head" in name:
        return 1.0
    return 0.15
