"""The demo embedding engine `make run` will configure (issue 15, CONTRACT
§8): a tiny randomly initialised BERT with a WordPiece tokenizer trained on
the spot. Its vectors mean nothing, but it exercises the embedding engine's
whole path (load, tokenize, pool, normalise, unload) with no download.

Real users point the admin at a real embedding model's directory (e.g.
intfloat/multilingual-e5-small): the engine loads either the same way.
"""
import pathlib

from gpu_manager.demo_model import pretrained_dir_create

DEMO_EMBEDDER_NAME = "embed_demo"

_CLS, _SEP, _UNK, _PAD, _MASK = "[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"
_CORPUS = (
    "Mount Etna is an active volcano on the east coast of Sicily.",
    "Sourdough bread is leavened by a starter of wild yeast.",
    "Ocean tides are caused by the gravitational pull of the Moon.",
    "A compiler translates source code into machine code.",
    "Vaccines train the immune system to recognise a pathogen.",
    "What is the capital of France? The capital of France is Paris.",
    "长江是中国第一长河，在上海注入东海。",
    "乌龙茶属于半发酵茶，介于绿茶和红茶之间。",
    "大熊猫主要生活在四川的山区竹林中。",
    "活字印刷术由北宋的毕昇发明。",
    "中秋节人们赏月、吃月饼，象征家人团圆。",
)
_VOCAB_SIZE = 512


def demo_embedder_create(*, path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Make sure a complete demo embedder lives at `path` and return it
    (built beside it and renamed into place, as the demo chat model is)."""
    return pretrained_dir_create(path=path, seed=seed, tokenizer_build=_tokenizer_build,
                                 model_build=_model_build)


def _tokenizer_build():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token=_UNK))
    # BERT's: lowercase, accents stripped, each Chinese character its own word.
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=_VOCAB_SIZE, special_tokens=[_PAD, _UNK, _CLS, _SEP, _MASK],
                                        show_progress=False)
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    cls, sep = backend.token_to_id(_CLS), backend.token_to_id(_SEP)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_CLS} $A {_SEP}", pair=f"{_CLS} $A {_SEP} $B {_SEP}", special_tokens=[(_CLS, cls), (_SEP, sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=_UNK, pad_token=_PAD, cls_token=_CLS,
                                   sep_token=_SEP, mask_token=_MASK, model_max_length=512)


def _model_build(tokenizer, *, seed: int):
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return BertModel(config).eval()  # with its pooler: AutoModel builds one, and a missing one is a warning
