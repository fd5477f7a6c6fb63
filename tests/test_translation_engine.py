"""The translation engine (gpu_manager/engines.py TranslationEngine, issue
15) on the demo translators the project builds itself (a tiny random Marian
with a Unigram tokenizer trained on the spot; a tiny random M2M100 with a
SentencePiece model trained on the spot): text in, text out, a paragraph at
a time; a one-direction model refuses the other target; a multilingual one
serves both, told the source and forced to start in the target's language;
and an unload that frees what it loaded."""
import weakref

import pytest
from transformers import M2M100ForConditionalGeneration

from gpu_manager.demo_translator import demo_multilingual_translator_create, demo_translator_create
from gpu_manager.engines import TranslationEngine, TranslationUnsupported


@pytest.fixture(scope="module")
def translator_path(tmp_path_factory):
    return demo_translator_create(path=tmp_path_factory.mktemp("models") / "translate_demo")


@pytest.fixture
def engine(translator_path):
    engine = TranslationEngine(name="translate_demo", path=str(translator_path), device="cpu", targets=("en",))
    engine.load()
    yield engine
    if engine.model is not None:
        engine.unload()


def test_a_message_is_translated_paragraph_by_paragraph(engine):
    assert not engine.multilingual and engine.serves("en") and not engine.serves("zh-hans")
    text = engine.translate("你好，今天过得怎么样？\n\n长江是中国第一长河。", target="en")
    first, blank, second = text.split("\n")
    assert first.strip() and second.strip() and blank == ""  # a random model's words, one line per paragraph
    assert engine.translate("你好", target="en") == engine.translate("你好", target="en")  # greedy


def test_a_one_direction_model_refuses_the_other_target_and_an_unknown_one(engine, translator_path):
    with pytest.raises(TranslationUnsupported):
        engine.translate("Hello", target="zh-hans")
    with pytest.raises(TranslationUnsupported):
        engine.translate("Hello", target="fr")
    with pytest.raises(ValueError):
        TranslationEngine(name="x", path=str(translator_path), device="cpu", targets=("fr",))


def test_unloading_frees_the_model(engine):
    assert engine.nbytes > 0
    assert engine.unload() == {} and engine.model is None and not engine.loaded


@pytest.fixture(scope="module")
def multilingual_path(tmp_path_factory):
    return demo_multilingual_translator_create(path=tmp_path_factory.mktemp("models") / "m2m100_demo")


@pytest.fixture
def multilingual(multilingual_path):
    engine = TranslationEngine(name="m2m100_demo", path=str(multilingual_path), device="cpu")
    engine.load()
    yield engine
    if engine.model is not None:
        engine.unload()


def test_a_multilingual_model_is_told_the_source_and_forced_to_start_in_the_target(multilingual, monkeypatch):
    assert multilingual.multilingual and multilingual.serves("en") and multilingual.serves("zh-hans")
    sequences = []  # (encoder input, generated output) of each generate() call
    generate = M2M100ForConditionalGeneration.generate

    def recorded(model, *args, **kwargs):
        output = generate(model, *args, **kwargs)
        sequences.append((kwargs["input_ids"][0].tolist(), output[0].tolist()))
        return output

    monkeypatch.setattr(M2M100ForConditionalGeneration, "generate", recorded)
    tokenizer = multilingual.tokenizer
    codes = {tokenizer.get_lang_id(code): code for code in tokenizer.lang_code_to_id}
    for text, target, source_code, target_code in (
        ("Hello, how are you today?", "zh-hans", "en", "zh"),
        ("你好，今天过得怎么样？", "en", "zh", "en"),
    ):
        sequences.clear()
        translation = multilingual.translate(text, target=target)
        assert translation.strip() and "__" not in translation  # a random model's words, no language code
        [(source, output)] = sequences
        assert codes.get(source[0]) == source_code
        # The decoder starts with </s>, then the target's code; the model
        # itself never picks a code (demo_translator zeroes their output
        # rows), so only the forcing can have put it there.
        assert output[0] == tokenizer.eos_token_id and codes.get(output[1]) == target_code
        assert not set(output[2:]) & set(codes)


def test_unloading_a_multilingual_model_frees_it(multilingual):
    refs = [weakref.ref(multilingual.tokenizer), weakref.ref(multilingual.model),
            *(weakref.ref(t) for t in multilingual.model.parameters())]
    assert multilingual.unload() == {} and multilingual.model is None and not multilingual.loaded
    assert all(ref() is None for ref in refs)
