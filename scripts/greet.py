#!/usr/bin/env python3
"""Greets someone with a schema'd set of params (see greet.py.toml beside it)."""
import os
import sys

name = os.environ["RR_PARAM_NAME"]
times = int(os.environ.get("RR_PARAM_TIMES", "1"))
shout = os.environ.get("RR_PARAM_SHOUT") == "true"
lang = os.environ.get("RR_PARAM_LANG", "en")
word = {"en": "Hello", "fr": "Bonjour", "de": "Hallo"}[lang]
for _ in range(times):
    line = f"{word}, {name}!"
    print(line.upper() if shout else line)
print("argv:", " ".join(sys.argv[1:]))  # a secret param is never an argument
print("api_key given:", bool(os.environ.get("RR_PARAM_API_KEY")))
