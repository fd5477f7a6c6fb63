from django.contrib import admin
from django.urls import include, path, re_path

from chat.admin_gpu import gpu_page
from chat.api.http import not_found
from chat.metrics import metrics_view

urlpatterns = [
    # Before admin.site.urls, which would otherwise answer 404 for it.
    path("admin/gpu/", admin.site.admin_view(gpu_page), name="admin-gpu"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("v1/", include("chat.api.urls")),
    re_path(r"^v1$", not_found),  # OpenAI's shape for the bare prefix too, not the page's HTML 404
    path("", include("chat.urls")),
]
