"""`/v1/files` and `/v1/batches`: OpenAI's Files and Batch APIs over the
batch services (chat/batches.py)."""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from chat import batches
from chat.api.http import api_view, json_body
from chat.completions import RequestError
from chat.models import Batch, BatchFile



def _file_get(request: HttpRequest, file_id: str) -> BatchFile:
    file = BatchFile.objects.filter(pk=file_id, user=request.user).defer("content").first()
    if file is None:
        raise RequestError("not_found", f"No such File object: {file_id}", param="id", status=404)
    return file


def _batch_get(request: HttpRequest, batch_id: str) -> Batch:
    batch = Batch.objects.filter(pk=batch_id, user=request.user).first()
    if batch is None:
        raise RequestError("not_found", f"No batch found with id '{batch_id}'.", param="batch_id", status=404)
    return batch


def _limit(request: HttpRequest, *, default: int, maximum: int) -> int:
    """OpenAI's list limits: batches 20 (at most 100), files 10,000."""
    try:
        limit = int(request.GET.get("limit", default))
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise RequestError("invalid_request", f"limit must be an integer from 1 to {maximum}.", param="limit")
    return limit


def _page(objects: list[dict], has_more: bool) -> JsonResponse:
    return JsonResponse({"object": "list", "data": objects, "first_id": objects[0]["id"] if objects else None,
                         "last_id": objects[-1]["id"] if objects else None, "has_more": has_more})


@api_view("GET", "POST")
def files(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        found = BatchFile.objects.filter(user=request.user).defer("content").order_by("-created_at")
        if request.GET.get("purpose"):
            found = found.filter(purpose=request.GET["purpose"])
        limit = _limit(request, default=10_000, maximum=10_000)
        found = list(found[:limit + 1])
        return _page([batches.file_object(f) for f in found[:limit]], has_more=len(found) > limit)
    upload = request.FILES.get("file")
    if upload is None:
        raise RequestError("invalid_request", "Send the file as multipart form field 'file'.", param="file")
    file = batches.file_create(user=request.user, filename=upload.name, data=upload.read(),
                               purpose=request.POST.get("purpose", ""))
    return JsonResponse(batches.file_object(file))


@api_view("GET")
def file_detail(request: HttpRequest, file_id: str) -> JsonResponse:
    return JsonResponse(batches.file_object(_file_get(request, file_id)))


@api_view("GET")
def file_content(request: HttpRequest, file_id: str) -> HttpResponse:
    file = BatchFile.objects.filter(pk=_file_get(request, file_id).pk).only("content").get()
    return HttpResponse(file.content.encode(), content_type="application/octet-stream")


@api_view("GET", "POST")
def batches_view(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        page, has_more = batches.batches_of(user=request.user, after=request.GET.get("after"),
                                             limit=_limit(request, default=20, maximum=100))
        return _page([batches.batch_object(b) for b in page], has_more)
    body = json_body(request)
    batch = batches.batch_create(user=request.user, input_file_id=str(body.get("input_file_id", "")),
                                 endpoint=str(body.get("endpoint", "")),
                                 completion_window=str(body.get("completion_window", "24h")),
                                 metadata=body.get("metadata"))
    return JsonResponse(batches.batch_object(batch))


@api_view("GET")
def batch_detail(request: HttpRequest, batch_id: str) -> JsonResponse:
    return JsonResponse(batches.batch_object(_batch_get(request, batch_id)))


@api_view("POST")
def batch_cancel(request: HttpRequest, batch_id: str) -> JsonResponse:
    batch = batches.batch_cancel(batch=_batch_get(request, batch_id))
    return JsonResponse(batches.batch_object(batch))
