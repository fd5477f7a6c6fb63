"""The demo local model that `make run` creates (CONTRACT §1, §3).

A tiny randomly initialised Llama with its own byte-level BPE tokenizer: it
says nothing meaningful, but it exercises the whole local-engine path (load,
chat template, streaming generation, unload) in well under a second and with
no download, so a fresh checkout and the test suite work offline.

torch, tokenizers and transformers are imported inside the functions that
build: they take seconds to import, and a caller whose model already exists
(every `make run` after the first) should not pay for that.
"""

import errno
import os
import pathlib
import shutil
import tempfile

DEMO_MODEL_NAME = "local_demo"

# save_pretrained may write more (generation_config.json, chat_template.jinja),
# but these are what from_pretrained cannot do without.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_BOS, _EOS, _UNK, _PAD = "<s>", "</s>", "<unk>", "<pad>"
_ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
_SPECIAL_TOKENS = (_BOS, _EOS, _UNK, _PAD, *_ROLE_MARKERS)

# Each turn ends with eos so that a real (trained) model would learn to stop
# there; add_generation_prompt opens the assistant turn the model continues.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Enough text that BPE learns merges for common English and Chinese chat words,
# so prompts tokenize into a handful of tokens rather than raw bytes.
_CORPUS = (
    "Hello! How can I help you today?",
    "Hi there, what would you like to talk about?",
    "Tell me a story about a dragon who learned to read.",
    "Once upon a time, in a quiet village by the sea, there lived a curious child.",
    "The weather is nice today, let's go for a walk in the park.",
    "Can you explain how a transformer language model works?",
    "Sure. It reads the text as tokens and predicts the next token, one at a time.",
    "What is the capital of France? The capital of France is Paris.",
    "Please summarise this article in three sentences.",
    "Thank you very much for your help!",
    "You're welcome. Is there anything else I can do for you?",
    "Write a short poem about the moon and the stars.",
    "I am a helpful assistant. I answer questions clearly and briefly.",
    "How do I install Python packages with pip?",
    "Run pip install followed by the package name in your terminal.",
    "Good morning! Did you sleep well?",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14",
    "Translate 'good night' into Chinese, please.",
    "你好！今天我能帮你做什么？",
    "你好，请问有什么可以帮您的吗？",
    "给我讲一个故事吧。",
    "从前，在一个安静的海边小村庄里，住着一个好奇的孩子。",
    "今天天气很好，我们去公园散步吧。",
    "请解释一下语言模型是如何工作的。",
    "它把文本切分成词元，然后一个接一个地预测下一个词元。",
    "中国的首都是哪里？中国的首都是北京。",
    "谢谢你的帮助！不客气，还有什么需要吗？",
    "请用三句话总结这篇文章。",
    "写一首关于月亮和星星的短诗。",
    "我是一个乐于助人的助手，我会清楚简洁地回答问题。",
    "早上好！你昨晚睡得好吗？",
    "晚安，祝你做个好梦。",
    "我喜欢学习中文和英文。",
    "这个问题很有意思，让我想一想。",
    "The system prompt tells the assistant how to behave.",
    "The user asks a question and the assistant answers it.",
)

_VOCAB_SIZE = 768

# Prompts the built model is checked against; see _generates_fully.
_PROBE_PROMPTS = ("hi", "Tell me a story", "你好")
_PROBE_NEW_TOKENS = 64
# A random model passes with overwhelming probability (see _silence_special_tokens),
# so a few seeds is ample; the bound only turns a broken library into an error.
_SEED_ATTEMPTS = 8


class DemoModelError(RuntimeError):
    """The demo model could not be built so that it generates as promised."""


def demo_model_create(*, path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Make sure a complete demo model lives at `path` and return `path`.

    Builds in a sibling temporary directory and renames it into place, so an
    interrupted build never leaves a half-written model that a later call (or
    a worker's from_pretrained) would mistake for a complete one. The weights
    come from torch.manual_seed(seed); in the practically impossible case
    that they end a probe reply early, the next seed is used.
    """
    return model_dir_create(path=path, build=lambda staging: _build(staging, seed=seed))


def model_dir_create(*, path: pathlib.Path, build) -> pathlib.Path:
    """Make sure a complete model directory lives at `path`: when it does
    not, `build(staging)` writes one into a sibling temporary directory,
    which is then renamed into place (the demo models: this one,
    demo_embedder, demo_translator)."""
    path = pathlib.Path(path)
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        build(staging)
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def pretrained_dir_create(*, path: pathlib.Path, seed: int, tokenizer_build, model_build) -> pathlib.Path:
    """`model_dir_create` for a tokenizer and a model made from it
    (`model_build(tokenizer, seed=seed)`), both saved with save_pretrained."""
    def build(staging: pathlib.Path) -> None:
        tokenizer = tokenizer_build()
        model_build(tokenizer, seed=seed).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return model_dir_create(path=path, build=build)


def _is_complete(path: pathlib.Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _move_into_place(staging: pathlib.Path, path: pathlib.Path) -> None:
    try:
        # rename(2) atomically replaces a missing or empty directory.
        os.rename(staging, path)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _is_complete(path):
        # Another process (e.g. a parallel test) won the race; its model is as good.
        return
    # Leftovers from a build made before builds were atomic: nothing there is usable.
    shutil.rmtree(path)
    os.rename(staging, path)


def _build(directory: pathlib.Path, *, seed: int) -> None:
    tokenizer = _tokenizer_build()
    for attempt in range(seed, seed + _SEED_ATTEMPTS):
        model = _model_build(tokenizer, seed=attempt)
        if _generates_fully(model, tokenizer):
            break
    else:
        raise DemoModelError(
            f"no seed in {seed}..{seed + _SEED_ATTEMPTS - 1} gives a demo model that "
            f"generates {_PROBE_NEW_TOKENS} tokens for {_PROBE_PROMPTS}"
        )
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory, safe_serialization=True)


def _tokenizer_build():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=_UNK))
    # Byte level: any Unicode text (Chinese included) encodes with no <unk>.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        pad_token=_PAD,
        additional_special_tokens=list(_ROLE_MARKERS),
        chat_template=_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _model_build(tokenizer, *, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _silence_special_tokens(model, tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return model


def _silence_special_tokens(model, tokenizer) -> None:
    # A random model stops wherever eos happens to win the argmax, which makes
    # "a reply streams until max_new_tokens" flaky to test and confusing to
    # watch. With its lm_head row zeroed eos always scores exactly 0 (Llama's
    # lm_head has no bias), while the largest of the ~700 other random logits
    # is positive unless every one of them is negative (odds about 2**-700).
    # The same for the other special tokens, so greedy output never contains
    # a role marker or padding, and for byte tokens that do not decode to
    # printable text on their own (a lone UTF-8 continuation byte shows as
    # U+FFFD, a control byte as nothing), so the demo's random replies at
    # least read as words and characters in the chat page.
    import torch

    ids = tokenizer.convert_tokens_to_ids(list(_SPECIAL_TOKENS))
    ids += [i for i in range(len(tokenizer)) if not _printable(tokenizer.decode([i]))]
    with torch.no_grad():
        model.lm_head.weight[ids] = 0.0


def _printable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in " \n" for c in text)


def _generates_fully(model, tokenizer) -> bool:
    import torch

    for prompt in _PROBE_PROMPTS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            output = model.generate(
                **inputs, do_sample=False, max_new_tokens=_PROBE_NEW_TOKENS
            )
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        if len(new_tokens) != _PROBE_NEW_TOKENS:
            return False
        if not tokenizer.decode(new_tokens, skip_special_tokens=True).strip():
            return False
    return True
