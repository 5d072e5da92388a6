"""Verifiers that misbehave on purpose, loaded into pool workers as a plugin by the pool tests."""

import ctypes
import os
import time

from tsched.verify.verifiers import register


@register("hang")
def hang(completion, answer):
    time.sleep(3600)


@register("exit")
def hard_exit(completion, answer):
    os._exit(3)


@register("segfault")
def segfault(completion, answer):
    ctypes.string_at(0)


@register("oom")
def oom(completion, answer):
    blocks = []
    while True:
        blocks.append(bytearray(64 * 2**20))


@register("raise")
def raises(completion, answer):
    raise RuntimeError("parser exploded")
