"""The model catalog's per-process memo (chat/catalog.py): a message's
model is resolved without a query once known, and an endpoint row saved in
any process is seen by every process at its next message."""
import time

import pytest

from chat import catalog
from chat.catalog import UnknownModel, catalog_forget, model_resolve
from chat.models import ModelConfig

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_known_model_resolves_without_a_query_or_a_discovery(stack, django_assert_num_queries):
    catalog_forget()
    assert model_resolve("ollama_qwen:7b").base_url == stack.ollama.url
    tags = len(stack.ollama.requests_to("/api/tags"))
    with django_assert_num_queries(0):
        assert model_resolve("ollama_qwen:7b").upstream == "qwen:7b"
    assert len(stack.ollama.requests_to("/api/tags")) == tags


def test_an_endpoint_row_saved_elsewhere_is_seen_at_the_next_resolve(stack):
    catalog_forget()
    other = catalog._Memo()  # another process's memo: nothing clears it but the version
    assert [e.base_url for e in other.endpoints() if e.kind == "ollama"] == [stack.ollama.url]
    # An admin disables the environment's Ollama (a disabled row for its URL).
    row = ModelConfig.objects.create(kind="ollama", name="off", base_url=stack.ollama.url, enabled=False)
    try:
        assert [e for e in other.endpoints() if e.kind == "ollama"] == []
        with pytest.raises(UnknownModel):
            model_resolve("ollama_qwen:7b")
    finally:
        row.delete()
    assert [e.base_url for e in other.endpoints() if e.kind == "ollama"] == [stack.ollama.url]
    assert model_resolve("ollama_qwen:7b").upstream == "qwen:7b"


def test_what_a_transaction_read_is_not_kept(stack):
    """Rows read inside a transaction may yet roll back: not memoized."""
    from django.db import transaction

    catalog_forget()
    with transaction.atomic():
        ModelConfig.objects.create(kind="ollama", name="off", base_url=stack.ollama.url, enabled=False)
        with pytest.raises(UnknownModel):
            model_resolve("ollama_qwen:7b")
        transaction.set_rollback(True)
    assert model_resolve("ollama_qwen:7b").upstream == "qwen:7b"


def test_a_flush_which_deletes_rows_without_their_signals_is_seen_too(stack):
    """The test runner's flush between transactional tests (and a migrate)
    change rows without post_save or post_delete: post_migrate moves the
    version on, or a memo would keep an endpoint row that is gone."""
    from django.core.management import call_command

    catalog_forget()
    other = catalog._Memo()
    ModelConfig.objects.create(kind="ollama", name="off", base_url=stack.ollama.url, enabled=False)
    assert [e for e in other.endpoints() if e.kind == "ollama"] == []
    call_command("flush", verbosity=0, interactive=False)
    assert [e.base_url for e in other.endpoints() if e.kind == "ollama"] == [stack.ollama.url]


def test_the_model_list_reads_the_shared_discoveries_not_a_memo(stack):
    """A page's model list (catalog_list) does not check the catalog's
    version: it reads the shared cache, so `catalog_forget` shows an
    endpoint gone down at once, even where a message's model was memoized."""
    from chat.catalog import catalog_list

    catalog_forget()
    assert model_resolve("ollama_qwen:7b").upstream == "qwen:7b"  # memoized, discovery included
    url = stack.ollama.url
    stack.ollama.stop()
    try:
        catalog_forget()
        # What a process that memoized the model before the forget still holds.
        catalog._memo.endpoints()
        endpoint = next(e for e in catalog.endpoints() if e.kind == "ollama")
        catalog._memo.discovery_keep(endpoint, {"ok": True, "models": ["qwen:7b"], "detail": "",
                                                "until": time.time() + 60})
        _, errors = catalog_list()
        assert [e["endpoint"] for e in errors] == [url]
    finally:
        stack.ollama.start()
        catalog_forget()
