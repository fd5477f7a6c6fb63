"""The demo translation engine `make run` will configure (issue 15,
CONTRACT §9): a tiny randomly initialised Marian model (the architecture
of Helsinki-NLP's opus-mt models) with a Unigram tokenizer (SentencePiece's
algorithm, trained here with `tokenizers`, offline) on a few English and
Chinese lines. Its translations are random words, but it exercises the
translation engine's whole path (load, translate, unload) with no download.

Beside it, for the engine's other adapter, a tiny random M2M100 (the
architecture of facebook/m2m100_418M, one model for every direction) with
transformers' own `M2M100Tokenizer`: a SentencePiece BPE model (trained
here with `sentencepiece`, offline) and its vocab.json, the language codes
after them.
"""
import pathlib

from gpu_manager.demo_model import model_dir_create, pretrained_dir_create

DEMO_TRANSLATOR_NAME = "translate_demo"

_PAD, _EOS, _UNK = "<pad>", "</s>", "<unk>"
_CORPUS = (
    "Hello, how are you today?", "Thank you very much for your help.", "The weather is nice today.",
    "Please translate this message into Chinese.", "Mount Etna is an active volcano in Sicily.",
    "你好，今天过得怎么样？", "非常感谢你的帮助。", "今天天气很好。", "请把这条消息翻译成英文。",
    "长江是中国第一长河。", "乌龙茶属于半发酵茶。",
)
_VOCAB_SIZE = 400


def demo_translator_create(*, path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Make sure a complete demo translator lives at `path` and return it
    (built beside it and renamed into place, as the demo chat model is)."""
    return pretrained_dir_create(path=path, seed=seed, tokenizer_build=_tokenizer_build,
                                 model_build=_model_build)


def demo_multilingual_translator_create(*, path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Make sure a complete tiny M2M100 lives at `path` and return it (built
    beside it and renamed into place, as the demo chat model is)."""
    def build(staging: pathlib.Path) -> None:
        # M2M100Tokenizer is made from its files, not from a tokenizers
        # object: they are written into the staging directory first.
        tokenizer = _m2m100_tokenizer_build(staging)
        _m2m100_model_build(tokenizer, seed=seed).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return model_dir_create(path=path, build=build)


def _tokenizer_build():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=_VOCAB_SIZE, special_tokens=[_PAD, _EOS, _UNK], unk_token=_UNK,
                                      show_progress=False)
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {_EOS}", pair=f"$A $B {_EOS}", special_tokens=[(_EOS, backend.token_to_id(_EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=_PAD, eos_token=_EOS, unk_token=_UNK,
                                   model_max_length=512)


def _model_build(tokenizer, *, seed: int):
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = MarianConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=512, pad_token_id=pad, eos_token_id=eos,
                          decoder_start_token_id=pad, forced_eos_token_id=eos)
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    # A random model stops wherever eos wins; with its output row zeroed it
    # never does, and a translation is as long as the engine allows.
    with torch.no_grad():
        model.lm_head.weight[[pad, eos]] = 0.0
    model.generation_config = GenerationConfig(pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
    return model


# fairseq's dictionary, which M2M100's vocab.json is: these four first, in this order.
_M2M100_SPECIAL = ("<s>", _PAD, _EOS, _UNK)


def _m2m100_tokenizer_build(directory: pathlib.Path):
    import io
    import json

    import sentencepiece
    from transformers import M2M100Tokenizer
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    model = io.BytesIO()
    # hard_vocab_limit off: the corpus has fewer merges than _VOCAB_SIZE, and
    # the trainer takes what there is instead of failing. No bos or eos of
    # its own: the tokenizer adds the language code and </s> (from vocab.json).
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=model, model_type="bpe", vocab_size=_VOCAB_SIZE,
        hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {token: i for i, token in enumerate(_M2M100_SPECIAL)}
    for i in range(pieces.get_piece_size()):
        if not (pieces.is_unknown(i) or pieces.is_control(i)):
            vocab[pieces.id_to_piece(i)] = len(vocab)
    spm_file, vocab_file = directory / "sentencepiece.bpe.model", directory / "vocab.json"
    spm_file.write_bytes(model.getvalue())
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The language codes are special tokens (skipped when a translation is
    # decoded) only when listed as such, as the real checkpoints'
    # tokenizer_config.json lists them: transformers 5's M2M100Tokenizer
    # does not add them itself (its test for that is never true).
    codes = [f"__{code}__" for code in FAIRSEQ_LANGUAGE_CODES["m2m100"]]
    return M2M100Tokenizer(vocab_file=str(vocab_file), spm_file=str(spm_file), model_max_length=1024,
                           additional_special_tokens=codes)


def _m2m100_model_build(tokenizer, *, seed: int):
    import torch
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    # The language codes and the made-up words follow the words, as in the
    # real checkpoints (facebook/m2m100_418M: 128,004 + 100 + 8 = 128,112).
    vocab_size = tokenizer.vocab_size + len(tokenizer.lang_code_to_id) + tokenizer.num_madeup_words
    bos, pad, eos = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    config = M2M100Config(vocab_size=vocab_size, d_model=64, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=1024, bos_token_id=bos, pad_token_id=pad,
                          eos_token_id=eos, decoder_start_token_id=eos)
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config).eval()
    # As the Marian's: with their output rows zeroed (no bias) the special
    # tokens never win, so a translation is as long as the engine allows,
    # and a language code appears only where generate() is forced to put one.
    silent = [*tokenizer.convert_tokens_to_ids(list(_M2M100_SPECIAL)), *range(tokenizer.vocab_size, vocab_size)]
    with torch.no_grad():
        model.lm_head.weight[silent] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=bos, pad_token_id=pad, eos_token_id=eos,
                                               decoder_start_token_id=eos)
    return model
