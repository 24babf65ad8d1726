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


_lib = _load()
AVAILABLE = _lib is not None


class _Info(ctypes.Structure):
    _fields_ = [("age", c_int), ("version_num", c_int), ("version_str", ctypes.c_char_p),
                ("proto_str", ctypes.c_char_p)]


# nghttp2.h: typedef struct { size_t length; int32_t stream_id; uint8_t type, flags,
# reserved; } nghttp2_frame_hd; every member of the nghttp2_frame union starts with it.
class _Hd(ctypes.Structure):
    _fields_ = [("length", c_size_t), ("stream_id", c_int32), ("type", c_uint8),
                ("flags", c_uint8), ("reserved", c_uint8)]


class _PriSpec(ctypes.Structure):
    _fields_ = [("stream_id", c_int32), ("weight", c_int32), ("exclusive", c_uint8)]


class _NV(ctypes.Structure):
    # The library copies names and values (no NGHTTP2_NV_FLAG_NO_COPY_*): the Python bytes
    # only have to live for the duration of the submit call.
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p),
                ("namelen", c_size_t), ("valuelen", c_size_t), ("flags", c_uint8)]


class _Headers(ctypes.Structure):  # nghttp2_headers
    _fields_ = [("hd", _Hd), ("padlen", c_size_t), ("pri_spec", _PriSpec),
                ("nva", c_void_p), ("nvlen", c_size_t), ("cat", c_int)]


class _RstStream(ctypes.Structure):  # nghttp2_rst_stream
    _fields_ = [("hd", _Hd), ("error_code", c_uint32)]


class _SettingsEntry(ctypes.Structure):  # nghttp2_settings_entry
    _fields_ = [("settings_id", c_int32), ("value", c_uint32)]


class _Settings(ctypes.Structure):  # nghttp2_settings
    _fields_ = [("hd", _Hd), ("niv", c_size_t), ("iv", ctypes.POINTER(_SettingsEntry))]


class _Goaway(ctypes.Structure):  # nghttp2_goaway
    _fields_ = [("hd", _Hd), ("last_stream_id", c_int32), ("error_code", c_uint32),
                ("opaque_data", c_void_p), ("opaque_data_len", c_size_t),
                ("reserved", c_uint8)]


# nghttp2_data_source_read_callback: ssize_t (*)(nghttp2_session *, int32_t stream_id,
# uint8_t *buf, size_t length, uint32_t *data_flags, nghttp2_data_source *, void *user_data)
_READ_CB = ctypes.CFUNCTYPE(c_ssize_t, c_void_p, c_int32, c_void_p, c_size_t, c_void_p,
                            c_void_p, c_void_p)


class _DataProvider(ctypes.Structure):  # nghttp2_data_provider (the source is unused)
    _fields_ = [("source", c_void_p), ("read_callback", _READ_CB)]


# Callback types (nghttp2.h "@functypedef"s).
_FRAME_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p)  # begin_headers, frame_recv
# (name and value as char *: nghttp2 guarantees them NUL-terminated, and ctypes makes the
# bytes in C, cheaper than a string_at call per field; lengths are checked against theirs.)
_HEADER_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, ctypes.c_char_p, c_size_t,
                              ctypes.c_char_p, c_size_t, c_uint8, c_void_p)
_CHUNK_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_uint8, c_int32, c_void_p, c_size_t, c_void_p)
_CLOSE_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_int32, c_uint32, c_void_p)
_INVALID_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_int, c_void_p)
_BEGIN_FRAME_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p)
_ERROR2_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, c_void_p, c_size_t, c_void_p)


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    assert _lib is not None
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


if _lib is not None:
    _version = _fn("nghttp2_version", ctypes.POINTER(_Info), c_int)
    VERSION: str = (_version(0).contents.version_str or b"").decode()
    _strerror = _fn("nghttp2_strerror", ctypes.c_char_p, c_int)
    _callbacks_new = _fn("nghttp2_session_callbacks_new", c_int, ctypes.POINTER(c_void_p))
    _option_new = _fn("nghttp2_option_new", c_int, ctypes.POINTER(c_void_p))
    _option_del = _fn("nghttp2_option_del", None, c_void_p)
    _server_new = _fn("nghttp2_session_server_new2", c_int, ctypes.POINTER(c_void_p),
                      c_void_p, c_void_p, c_void_p)
    _session_del = _fn("nghttp2_session_del", None, c_void_p)
    _mem_recv = _fn("nghttp2_session_mem_recv", c_ssize_t, c_void_p, ctypes.c_char_p,
                    c_size_t)
    _mem_send = _fn("nghttp2_session_mem_send", c_ssize_t, c_void_p,
                    ctypes.POINTER(c_void_p))
    _submit_settings = _fn("nghttp2_submit_settings", c_int, c_void_p, c_uint8,
                           ctypes.POINTER(_SettingsEntry), c_size_t)
    _submit_window_update = _fn("nghttp2_submit_window_update", c_int, c_void_p, c_uint8,
                                c_int32, c_int32)
    # (nva as char *: an nghttp2_nv array packed in a bytes object, see _nva.)
    _submit_headers = _fn("nghttp2_submit_headers", c_int32, c_void_p, c_uint8, c_int32,
                          c_void_p, ctypes.c_char_p, c_size_t, c_void_p)
    _submit_data = _fn("nghttp2_submit_data", c_int, c_void_p, c_uint8, c_int32,
                       ctypes.POINTER(_DataProvider))
    _submit_rst = _fn("nghttp2_submit_rst_stream", c_int, c_void_p, c_uint8, c_int32,
                      c_uint32)
    _terminate = _fn("nghttp2_session_terminate_session2", c_int, c_void_p, c_int32,
                     c_uint32)
    _consume = _fn("nghttp2_session_consume", c_int, c_void_p, c_int32, c_size_t)
    _stream_window = _fn("nghttp2_session_get_stream_remote_window_size", c_int32,
                         c_void_p, c_int32)
    _conn_window = _fn("nghttp2_session_get_remote_window_size", c_int32, c_void_p)
    _want_read = _fn("nghttp2_session_want_read", c_int, c_void_p)
    _resume_data = _fn("nghttp2_session_resume_data", c_int, c_void_p, c_int32)
    _set_max_continuations = (
        _fn("nghttp2_option_set_max_continuations", None, c_void_p, c_size_t)
        if hasattr(_lib, "nghttp2_option_set_max_continuations") else None)
    _set_no_auto_window_update = _fn("nghttp2_option_set_no_auto_window_update", None,
                                     c_void_p, c_int)
else:  # pragma: no cover - the machine has no libnghttp2
    VERSION = ""
