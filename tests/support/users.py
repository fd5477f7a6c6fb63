"""Users for tests, with Django's real password hasher run once per password.

`create_user` hashes with PBKDF2 (~0.3 s on this machine) every time; with a
user or two per test that was a third of the fast layer's time. The hash of
each password is made once per run and stored as it is: logging in with the
password (in this process, or in a web process of the stack) checks it with
the same hasher as always."""
from __future__ import annotations

import functools

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password


@functools.cache
def password_hash(raw: str) -> str:
    return make_password(raw)


def user_create(username: str, password: str, **fields):
    return get_user_model().objects.create(username=username, password=password_hash(password), **fields)


def superuser_create(username: str, password: str, **fields):
    return user_create(username, password, is_staff=True, is_superuser=True, **fields)
