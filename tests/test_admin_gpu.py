"""The admin's GPU page, through the real GPU worker."""
import pytest
from django.conf import settings

from chat.models import AuditEntry
from gpu_manager.state import GpuStateStore
from tests.support.waiting import wait_for


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


@pytest.mark.django_db(transaction=True)
def test_admin_gpu_page_unloads_and_loads_through_the_queue(admin_client, demo_model, workers):
    page = admin_client.get("/admin/gpu/")
    assert page.status_code == 200 and b"owner" in page.content
    admin_client.post("/admin/gpu/", {"action": "load", "model": "local_demo"})
    wait_for(lambda: store().read().local_models == ["local_demo"], timeout=30, what="load now")
    admin_client.post("/admin/gpu/", {"action": "unload"})
    wait_for(lambda: store().read().local_models == [], timeout=30, what="unload now")
    assert [e for e in store().events(5) if e["kind"] == "local_unload"][-1]["reason"] == "admin"
    refused = admin_client.post("/admin/gpu/", {"action": "load", "model": "nope"}, follow=True)
    assert b"No enabled local model" in refused.content
    # Who pressed which button (issue 17); the refused one did nothing.
    assert list(AuditEntry.objects.order_by("id").values_list("username", "action", "target")) == [
        ("admin", "gpu.load", "local_demo"), ("admin", "gpu.unload", "every local model")]
