from django.urls import path

from chat import views

urlpatterns = [
    path("", views.index, name="index"),
    path("api/gpu/", views.api_gpu, name="api-gpu"),
    path("api/models/", views.api_models, name="api-models"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]
