"""libnghttp2's ABI for ``wire/h2_nghttp2.py``: the library, its structures and its function
prototypes, declared through ``ctypes``.

Job: load libnghttp2 (``AVAILABLE`` says whether it is there) and declare, once, what the
adapter calls and what the library hands to its callbacks (``nghttp2.h``).

Rules:
- Declarations only: no state, no logic. The adapter (``h2_nghttp2.py``) is compiled with
  mypyc (``sniport/compiled.py``) and this module is not: mypyc cannot compile a
  ``ctypes.Structure`` subclass (its C refers to an undeclared ``CPyModule__ctypes``).
- Every layout and prototype matches nghttp2.h of the library versions sniport supports
  (1.52 and later); a mismatch is memory corruption, not an exception.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

# -- the library -------------------------------------------------------------------------

c_void_p, c_int, c_int32, c_uint8, c_uint32, c_size_t, c_ssize_t = (
    ctypes.c_void_p, ctypes.c_int, ctypes.c_int32, ctypes.c_uint8, ctypes.c_uint32,
    ctypes.c_size_t, ctypes.c_ssize_t)


def _load() -> ctypes.CDLL | None:
    for name in ("libnghttp2.so.14", ctypes.util.find_library("nghttp2")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


lib = _load()
AVAILABLE = lib is not None


class _Info(ctypes.Structure):
    _fields_ = [("age", c_int), ("version_num", c_int), ("version_str", ctypes.c_char_p),
                ("proto_str", ctypes.c_char_p)]


# nghttp2.h: typedef struct { size_t length; int32_t stream_id; uint8_t type, flags,
# reserved; } nghttp2_frame_hd; every member of the nghttp2_frame union starts with it.
class Hd(ctypes.Structure):
    _fields_ = [("length", c_size_t), ("stream_id", c_int32), ("type", c_uint8),
                ("flags", c_uint8), ("reserved", c_uint8)]


class _PriSpec(ctypes.Structure):
    _fields_ = [("stream_id", c_int32), ("weight", c_int32), ("exclusive", c_uint8)]


class NV(ctypes.Structure):
    # The library copies names and values (no NGHTTP2_NV_FLAG_NO_COPY_*): the Python bytes
    # only have to live for the duration of the submit call.
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p),
                ("namelen", c_size_t), ("valuelen", c_size_t), ("flags", c_uint8)]


class Headers(ctypes.Structure):  # nghttp2_headers
    _fields_ = [("hd", Hd), ("padlen", c_size_t), ("pri_spec", _PriSpec),
                ("nva", c_void_p), ("nvlen", c_size_t), ("cat", c_int)]


class RstStream(ctypes.Structure):  # nghttp2_rst_stream
    _fields_ = [("hd", Hd), ("error_code", c_uint32)]


class SettingsEntry(ctypes.Structure):  # nghttp2_settings_entry
    _fields_ = [("settings_id", c_int32), ("value", c_uint32)]


class Settings(ctypes.Structure):  # nghttp2_settings
    _fields_ = [("hd", Hd), ("niv", c_size_t), ("iv", ctypes.POINTER(SettingsEntry))]


class Goaway(ctypes.Structure):  # nghttp2_goaway
    _fields_ = [("hd", Hd), ("last_stream_id", c_int32), ("error_code", c_uint32),
                ("opaque_data", c_void_p), ("opaque_data_len", c_size_t),
                ("reserved", c_uint8)]


# nghttp2_data_source_read_callback: ssize_t (*)(nghttp2_session *, int32_t stream_id,
# uint8_t *buf, size_t length, uint32_t *data_flags, nghttp2_data_source *, void *user_data)
READ_CB = ctypes.CFUNCTYPE(c_ssize_t, c_void_p, c_int32, c_void_p, c_size_t, c_void_p,
                            c_void_p, c_void_p)


class DataProvider(ctypes.Structure):  # nghttp2_data_provider (the source is unused)
    _fields_ = [("source", c_void_p), ("read_callback", READ_CB)]


# Callback types (nghttp2.h "@functypedef"s).
FRAME_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p)  # begin_headers, frame_recv
# (name and value as char *: nghttp2 guarantees them NUL-terminated, and ctypes makes the
# bytes in C, cheaper than a string_at call per field; lengths are checked against theirs.)
HEADER_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, ctypes.c_char_p, c_size_t,
                              ctypes.c_char_p, c_size_t, c_uint8, c_void_p)
CHUNK_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_uint8, c_int32, c_void_p, c_size_t, c_void_p)
CLOSE_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_int32, c_uint32, c_void_p)
INVALID_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_int, c_void_p)
BEGIN_FRAME_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p)
ERROR2_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, c_void_p, c_size_t, c_void_p)


def fn(name: str, restype: Any, *argtypes: Any) -> Any:
    assert lib is not None
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


# The prototypes. Without the library they stay None and AVAILABLE is false (the adapter
# refuses to start, and the h2 engine is used): importing the adapter never fails.
VERSION = ""
strerror: Any = None
callbacks_new: Any = None
option_new: Any = None
option_del: Any = None
server_new: Any = None
session_del: Any = None
mem_recv: Any = None
mem_send: Any = None
submit_settings: Any = None
submit_window_update: Any = None
submit_headers: Any = None
submit_data: Any = None
submit_rst: Any = None
terminate: Any = None
consume: Any = None
stream_window: Any = None
conn_window: Any = None
want_read: Any = None
set_max_continuations: Any = None  # also None in a library without the CVE-2024-28182 fix
set_no_auto_window_update: Any = None
if lib is not None:
    _version = fn("nghttp2_version", ctypes.POINTER(_Info), c_int)
    VERSION = (_version(0).contents.version_str or b"").decode()
    strerror = fn("nghttp2_strerror", ctypes.c_char_p, c_int)
    callbacks_new = fn("nghttp2_session_callbacks_new", c_int, ctypes.POINTER(c_void_p))
    option_new = fn("nghttp2_option_new", c_int, ctypes.POINTER(c_void_p))
    option_del = fn("nghttp2_option_del", None, c_void_p)
    server_new = fn("nghttp2_session_server_new2", c_int, ctypes.POINTER(c_void_p),
                    c_void_p, c_void_p, c_void_p)
    session_del = fn("nghttp2_session_del", None, c_void_p)
    mem_recv = fn("nghttp2_session_mem_recv", c_ssize_t, c_void_p, ctypes.c_char_p, c_size_t)
    mem_send = fn("nghttp2_session_mem_send", c_ssize_t, c_void_p, ctypes.POINTER(c_void_p))
    submit_settings = fn("nghttp2_submit_settings", c_int, c_void_p, c_uint8,
                         ctypes.POINTER(SettingsEntry), c_size_t)
    submit_window_update = fn("nghttp2_submit_window_update", c_int, c_void_p, c_uint8,
                              c_int32, c_int32)
    # (nva as char *: an nghttp2_nv array packed in a bytes object, see the adapter's _nva.)
    submit_headers = fn("nghttp2_submit_headers", c_int32, c_void_p, c_uint8, c_int32,
                        c_void_p, ctypes.c_char_p, c_size_t, c_void_p)
    submit_data = fn("nghttp2_submit_data", c_int, c_void_p, c_uint8, c_int32,
                     ctypes.POINTER(DataProvider))
    submit_rst = fn("nghttp2_submit_rst_stream", c_int, c_void_p, c_uint8, c_int32, c_uint32)
    terminate = fn("nghttp2_session_terminate_session2", c_int, c_void_p, c_int32, c_uint32)
    consume = fn("nghttp2_session_consume", c_int, c_void_p, c_int32, c_size_t)
    stream_window = fn("nghttp2_session_get_stream_remote_window_size", c_int32, c_void_p,
                       c_int32)
    conn_window = fn("nghttp2_session_get_remote_window_size", c_int32, c_void_p)
    want_read = fn("nghttp2_session_want_read", c_int, c_void_p)
    if hasattr(lib, "nghttp2_option_set_max_continuations"):
        set_max_continuations = fn("nghttp2_option_set_max_continuations", None, c_void_p,
                                   c_size_t)
    set_no_auto_window_update = fn("nghttp2_option_set_no_auto_window_update", None,
                                   c_void_p, c_int)
