"""The demo translation engine `make run` will configure (issue 15,
CONTRACT §9): a tiny randomly initialised Marian model (the architecture
of Helsinki-NLP's opus-mt models) with a Unigram tokenizer (SentencePiece's
algorithm, trained here with `tokenizers`, offline) on a few English and
Chinese lines. Its translations are random words, but it exercises the
translation engine's whole path (load, translate, unload) with no download.
"""
import pathlib

from gpu_manager.demo_model import pretrained_dir_create

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
