"""The translation engine (gpu_manager/engines.py TranslationEngine, issue
15) on the demo translator the project builds itself (a tiny random Marian
with a Unigram tokenizer trained on the spot): text in, text out, a
paragraph at a time; a one-direction model refuses the other target; and
an unload that frees what it loaded."""
import pytest

from gpu_manager.demo_translator import demo_translator_create
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
