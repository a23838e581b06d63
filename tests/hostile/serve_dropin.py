"""`evotok serve`'s drop-in flags (issue 28): --served-model-name and --allowed-origins, refused in one
line before the port is bound."""

from __future__ import annotations

from tests.hostile import Case

M = ["-m", "{model}"]

CASES = [
    Case("dropin-served-name-empty", ["serve", *M, "--served-model-name", ""], "--served-model-name"),
    Case("dropin-served-name-blank", ["serve", *M, "--served-model-name", "   "], "not a usable model id"),
    Case("dropin-served-name-padded", ["serve", *M, "--served-model-name", " tiny"], "no surrounding spaces"),
    Case("dropin-served-name-newline", ["serve", *M, "--served-model-name", "a\nb"], "--served-model-name"),
    Case("dropin-served-name-too-long", ["serve", *M, "--served-model-name", "x" * 300], "1 to 256"),
    Case("dropin-origins-no-scheme", ["serve", *M, "--allowed-origins", "app.example.com"],
         "'app.example.com' is not an origin"),
    Case("dropin-origins-path", ["serve", *M, "--allowed-origins", "https://a.example/app"], "is not an origin"),
    Case("dropin-origins-star-in-list", ["serve", *M, "--allowed-origins", "*,https://a.example"],
         "or * alone"),
    Case("dropin-origins-empty-item", ["serve", *M, "--allowed-origins", "https://a.example,"], "'' is not an origin"),
    Case("dropin-origins-ftp", ["serve", *M, "--allowed-origins", "ftp://a.example"], "is not an origin"),
    Case("dropin-strict-with-value", ["serve", *M, "--strict", "yes"], "yes"),
]
