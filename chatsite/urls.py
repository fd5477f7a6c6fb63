from django.contrib import admin
from django.urls import include, path

from chat.admin_gpu import gpu_page

urlpatterns = [
    # Before admin.site.urls, which would otherwise answer 404 for it.
    path("admin/gpu/", admin.site.admin_view(gpu_page), name="admin-gpu"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("v1/", include("chat.api.urls")),
    path("", include("chat.urls")),
]
