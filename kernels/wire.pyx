# Protobuf wire encoding of a ranked list: the unary answer's bytes straight
# from the model's arrays (item rows, scores), with no message object per item
# (upb's RankedItem adds cost ~0.8 us each, and the item ids would first become
# Python strings). Field layout: https://protobuf.dev/programming-guides/encoding/
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

import numpy as np

from .topk import check_array

cdef enum:
    WIRE_VARINT = 0
    WIRE_I32 = 5
    WIRE_LEN = 2

# RankedItem's fields this encoder writes, as (number, wire type). The tags the
# encoder writes are made from this table and nothing else, and check_layout
# compares them with the generated descriptor (recserve.service.convert calls it
# at import), so a changed .proto fails loudly instead of sending a wrong wire.
RANKED_ITEM_FIELDS = {
    "item_id": (1, WIRE_LEN),
    "score": (2, WIRE_I32),
    "rank": (3, WIRE_VARINT),
    "score_std": (5, WIRE_I32),
}


cdef unsigned char field_tag(dict fields, str message, str name):
    """The one-byte tag of field `name` in a fields table of `message`."""
    number, kind = fields[name]
    if not 1 <= number < 16:  # one-byte tags: the encoder writes each as one char
        raise ValueError(f"{message}.{name}: field number {number} needs a longer tag")
    return <unsigned char> ((number << 3) | kind)


cdef unsigned char tag_of(str name):
    return field_tag(RANKED_ITEM_FIELDS, "RankedItem", name)


cdef unsigned char TAG_ITEM_ID = tag_of("item_id")
cdef unsigned char TAG_SCORE = tag_of("score")
cdef unsigned char TAG_RANK = tag_of("rank")
cdef unsigned char TAG_STD = tag_of("score_std")


def written_tags():
    """The tag byte the encoder writes for each RankedItem field (what is on the wire)."""
    return {"item_id": TAG_ITEM_ID, "score": TAG_SCORE, "rank": TAG_RANK, "score_std": TAG_STD}


def _check_fields(item, response, dict tags, str message, str repeated):
    """Raise RuntimeError unless descriptor `item` (of `message`) has the
    numbers and wire types of `tags` (name -> tag byte written) and
    `response`.`repeated` is that message; return the response's field numbers
    by name."""
    from google.protobuf.descriptor import FieldDescriptor

    wire_type = {
        FieldDescriptor.TYPE_STRING: WIRE_LEN,
        FieldDescriptor.TYPE_FLOAT: WIRE_I32,
        FieldDescriptor.TYPE_INT32: WIRE_VARINT,
        FieldDescriptor.TYPE_UINT32: WIRE_VARINT,
    }
    fields = item.fields_by_name
    for name, tag in tags.items():
        f = fields.get(name)
        if f is None or f.number != tag >> 3 or wire_type.get(f.type, -1) != tag & 7:
            raise RuntimeError(f"kernels.wire: {message}.{name} no longer matches the .proto")
    field = response.fields_by_name.get(repeated)
    if field is None or field.message_type is not item:
        raise RuntimeError(
            f"kernels.wire: {response.name}.{repeated} is no longer {message}")
    return {f.name: f.number for f in response.fields}


def check_layout(item, response):
    """Raise RuntimeError unless the RankedItem / RecommendResponse (or
    SimilarItemsResponse) descriptors (`item`, `response`) have the numbers and
    types of the tags this encoder writes; return the response's field numbers
    by name."""
    return _check_fields(item, response, written_tags(), "RankedItem", "items")


# RatingPrediction's fields, as RANKED_ITEM_FIELDS for RankedItem (checked against
# the descriptor by check_prediction_layout).
PREDICTION_FIELDS = {
    "item_id": (1, WIRE_LEN),
    "rating": (2, WIRE_I32),
    "std": (3, WIRE_I32),
    "lower": (4, WIRE_I32),
    "upper": (5, WIRE_I32),
}


cdef unsigned char prediction_tag(str name):
    return field_tag(PREDICTION_FIELDS, "RatingPrediction", name)


# item_id, then the four floats in field order (rating, std, lower, upper).
cdef unsigned char TAG_PRED_ID = prediction_tag("item_id")
cdef unsigned char TAG_PRED[4]
TAG_PRED[0] = prediction_tag("rating")
TAG_PRED[1] = prediction_tag("std")
TAG_PRED[2] = prediction_tag("lower")
TAG_PRED[3] = prediction_tag("upper")


def written_prediction_tags():
    """The tag byte encode_predictions writes for each RatingPrediction field."""
    return {
        "item_id": TAG_PRED_ID,
        "rating": TAG_PRED[0],
        "std": TAG_PRED[1],
        "lower": TAG_PRED[2],
        "upper": TAG_PRED[3],
    }


def check_prediction_layout(item, response):
    """check_layout for PredictRatingsResponse: raise RuntimeError unless the
    RatingPrediction descriptor `item` has the numbers and types this encoder
    writes and `response`.predictions is that message; return the response's
    field numbers by name."""
    return _check_fields(
        item, response, written_prediction_tags(), "RatingPrediction", "predictions")


def encode_predictions(item_ids, values, bytes head, bytes tail, int field):
    """`head` + one length-delimited RatingPrediction per id (item_id, then
    rating, std, lower, upper from the row of `values`) as repeated field
    `field` + `tail`, as one bytes object: PredictRatings' answer without a
    message object per item (upb's cost ~2 us each, 5 ms for 2,500 items).

    `item_ids` (any sequence) are str (written as UTF-8, in order); `values` is float32
    (len(item_ids), 4). Fields at their proto3 default (empty id, +0.0) are
    not written, as protobuf's own encoder does.
    """
    check_array(values, "values", np.float32, 2)
    # A tuple keeps every id (and so its UTF-8 buffer) alive and in place while
    # the bytes are written without the GIL (a tuple given is not copied).
    ids = tuple(item_ids)
    cdef Py_ssize_t n = len(ids)
    if values.shape[0] != n or values.shape[1] != 4:
        raise ValueError(f"values: shape {values.shape}, expected ({n}, 4)")
    if not 1 <= field < (1 << 29):
        raise ValueError(f"field: must be in [1, 2^29), got {field}")
    cdef const float[:, ::1] V = values
    cdef uint64_t tag = (<uint64_t> field << 3) | WIRE_LEN
    cdef int tag_len = varint_size(tag)
    cdef Py_ssize_t i, body, id_len, total = len(head) + len(tail)
    cdef int c
    cdef uint32_t bits
    cdef object item
    cdef const char** texts = <const char**> malloc(max(n, 1) * sizeof(char*))
    cdef Py_ssize_t* lens = <Py_ssize_t*> malloc(max(n, 1) * sizeof(Py_ssize_t))
    cdef char* p
    try:
        if texts == NULL or lens == NULL:
            raise MemoryError(f"encode_predictions: no scratch for {n} ids")
        # First pass: every id checked to be a str, its UTF-8 (cached by
        # CPython) and the answer's size.
        for i in range(n):
            item = ids[i]
            if type(item) is not str:
                raise TypeError(f"item_ids: position {i} is {type(item).__name__}, not str")
            texts[i] = PyUnicode_AsUTF8AndSize(item, &lens[i])
            id_len = lens[i]
            body = (1 + varint_size(<uint64_t> id_len) + id_len) if id_len else 0
            for c in range(4):
                if float_bits(V[i, c]):
                    body += 5
            total += tag_len + varint_size(<uint64_t> body) + body
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        memcpy(p, PyBytes_AS_STRING(head), len(head))
        p += len(head)
        with nogil:
            for i in range(n):
                id_len = lens[i]
                body = (1 + varint_size(<uint64_t> id_len) + id_len) if id_len else 0
                for c in range(4):
                    if float_bits(V[i, c]):
                        body += 5
                p = put_varint(p, tag)
                p = put_varint(p, <uint64_t> body)
                if id_len:
                    p[0] = TAG_PRED_ID
                    p = put_varint(p + 1, <uint64_t> id_len)
                    memcpy(p, texts[i], id_len)
                    p += id_len
                for c in range(4):
                    bits = float_bits(V[i, c])
                    if bits:
                        p[0] = TAG_PRED[c]
                        p = put_fixed32(p + 1, bits)
        memcpy(p, PyBytes_AS_STRING(tail), len(tail))
        return out
    finally:
        free(texts)
        free(lens)


def varint(unsigned long long v):
    """`v` as a protobuf varint."""
    cdef char buf[10]
    cdef char* end = put_varint(buf, v)
    return PyBytes_FromStringAndSize(buf, end - buf)


def string_field(int number, str value):
    """A length-delimited (string) field; empty, the proto3 default, is omitted."""
    if not value:
        return b""
    data = value.encode("utf-8")
    return varint((<unsigned long long> number << 3) | WIRE_LEN) + varint(len(data)) + data


cdef inline int varint_size(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char* put_varint(char* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <char> ((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <char> v
    return p + 1


cdef inline char* put_fixed32(char* p, uint32_t bits) noexcept nogil:
    # fixed32, little-endian whatever the host's byte order
    p[0] = <char> (bits & 0xFF)
    p[1] = <char> ((bits >> 8) & 0xFF)
    p[2] = <char> ((bits >> 16) & 0xFF)
    p[3] = <char> ((bits >> 24) & 0xFF)
    return p + 4


cdef inline Py_ssize_t id_length(const unsigned char* row, Py_ssize_t width) noexcept nogil:
    # numpy's bytes dtype pads with NULs, and no stored id ends with one (IdMap).
    while width > 0 and row[width - 1] == 0:
        width -= 1
    return width


cdef inline uint32_t float_bits(float x) noexcept nogil:
    cdef uint32_t u
    memcpy(&u, &x, 4)
    return u


cdef inline Py_ssize_t item_size(Py_ssize_t id_len, uint32_t score, Py_ssize_t rank,
                                 uint32_t std) noexcept nogil:
    # proto3: fields at their default (empty id, +0.0 score or std) are not written.
    cdef Py_ssize_t n = 1 + varint_size(<uint64_t> rank)
    if id_len:
        n += 1 + varint_size(<uint64_t> id_len) + id_len
    if score:
        n += 5
    if std:
        n += 5
    return n


def encode_ranked(ids, idx, scores, bytes head, bytes tail, int field, std=None):
    """`head` + one length-delimited RankedItem (item_id, score, rank from 1,
    score_std when `std` is given) per position as repeated field `field` +
    `tail`, as one bytes object.

    `ids` is a 2-d uint8 array: row i holds item i's UTF-8 id padded with NULs
    (an IdMap's bytes array viewed as uint8). `idx` (int32) are the ranked rows,
    best first, `scores` (float32) their scores and `std` (float32, optional)
    their predictive std (bayes_mf). Memory-mapped arrays work.
    """
    check_array(ids, "ids", np.uint8, 2)
    check_array(idx, "idx", np.int32, 1)
    check_array(scores, "scores", np.float32, 1)
    if idx.shape[0] != scores.shape[0]:
        raise ValueError(f"scores: length {scores.shape[0]}, expected {idx.shape[0]} (idx)")
    cdef const float[::1] sd
    cdef const float* sdp = NULL
    if std is not None:
        check_array(std, "std", np.float32, 1)
        if std.shape[0] != idx.shape[0]:
            raise ValueError(f"std: length {std.shape[0]}, expected {idx.shape[0]} (idx)")
        sd = std
        if sd.shape[0]:
            sdp = &sd[0]
    if not 1 <= field < (1 << 29):
        raise ValueError(f"field: must be in [1, 2^29), got {field}")
    cdef const unsigned char[:, ::1] I = ids
    cdef const int[::1] ix = idx
    cdef const float[::1] sc = scores
    cdef Py_ssize_t n = ix.shape[0], n_ids = I.shape[0], width = I.shape[1]
    cdef Py_ssize_t i, row, id_len, body, total = len(head) + len(tail)
    cdef uint64_t tag = (<uint64_t> field << 3) | WIRE_LEN
    cdef int tag_len = varint_size(tag)
    cdef uint32_t bits, std_bits = 0
    for i in range(n):
        row = ix[i]
        if not 0 <= row < n_ids:
            raise IndexError(f"idx: row {row} at position {i} outside [0, {n_ids})")
        if sdp != NULL:
            std_bits = float_bits(sdp[i])
        body = item_size(id_length(&I[row, 0], width), float_bits(sc[i]), i + 1, std_bits)
        total += tag_len + varint_size(<uint64_t> body) + body
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), len(head))
    p += len(head)
    with nogil:
        for i in range(n):
            row = ix[i]
            id_len = id_length(&I[row, 0], width)
            bits = float_bits(sc[i])
            if sdp != NULL:
                std_bits = float_bits(sdp[i])
            p = put_varint(p, tag)
            p = put_varint(p, <uint64_t> item_size(id_len, bits, i + 1, std_bits))
            if id_len:
                p[0] = TAG_ITEM_ID
                p = put_varint(p + 1, <uint64_t> id_len)
                memcpy(p, &I[row, 0], id_len)
                p += id_len
            if bits:
                p[0] = TAG_SCORE
                p = put_fixed32(p + 1, bits)
            p[0] = TAG_RANK
            p = put_varint(p + 1, <uint64_t> (i + 1))
            if std_bits:
                p[0] = TAG_STD
                p = put_fixed32(p + 1, std_bits)
    memcpy(p, PyBytes_AS_STRING(tail), len(tail))
    return out


cdef Py_ssize_t find_row(
    const unsigned char* rows, Py_ssize_t n, Py_ssize_t width, object k, unsigned char* key
) except -2:
    """lookup's search for one key in n sorted rows of `width` bytes (`key`:
    scratch of `width` bytes). The key's UTF-8 is read in place (a str keeps
    it; ASCII is its own), not encoded into a new bytes object per key, and
    the search holds the GIL: releasing it costs more than a dozen memcmp."""
    cdef Py_ssize_t klen, lo = 0, hi = n, mid
    cdef const char* text
    if type(k) is not str:
        k = str(k)
    text = PyUnicode_AsUTF8AndSize(k, &klen)
    if n == 0 or klen > width or (klen and (<const unsigned char*> text)[klen - 1] == 0):
        return -1
    memcpy(key, text, klen)
    memset(key + klen, 0, width - klen)
    while lo < hi:  # the first row >= key
        mid = (lo + hi) >> 1
        if memcmp(rows + mid * width, key, width) < 0:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < n and memcmp(rows + lo * width, key, width) == 0 else -1


cdef const unsigned char* first_row(const unsigned char[:, ::1] rows):
    """The rows' first byte (NULL for no rows: find_row answers -1 before reading)."""
    return &rows[0, 0] if rows.shape[0] and rows.shape[1] else NULL


def lookup(const unsigned char[:, ::1] rows, keys):
    """Row of each key in `rows` (int64; -1 where absent): an IdMap's sorted ids
    as fixed-width NUL-padded UTF-8 rows (`IdMap.rows`), `keys` a sequence of
    str. The same answer as a numpy bytes-dtype searchsorted (whose order is
    memcmp's over the padded rows), without building a key array first: one
    binary search per key. A key longer than a row, or ending in NUL (numpy's
    bytes dtype drops trailing NULs, so such an id is never stored), is absent."""
    cdef Py_ssize_t t, count = len(keys)
    out = np.empty(count, np.int64)
    cdef long long[::1] o = out
    cdef unsigned char pad[256]
    cdef bytearray wide
    cdef unsigned char* key = pad
    if rows.shape[1] > 256:
        wide = bytearray(rows.shape[1])
        key = <unsigned char*> PyByteArray_AS_STRING(wide)
    cdef const unsigned char* first = first_row(rows)
    cdef Py_ssize_t n = rows.shape[0], width = rows.shape[1]
    for t in range(count):
        o[t] = find_row(first, n, width, keys[t], key)
    return out


def lookup_one(const unsigned char[:, ::1] rows, key):
    """lookup() of one key, as an int (the serving path's user lookup)."""
    cdef unsigned char pad[256]
    cdef bytearray wide
    cdef const unsigned char* first = first_row(rows)
    cdef Py_ssize_t n = rows.shape[0], width = rows.shape[1]
    if width > 256:
        wide = bytearray(width)
        return find_row(first, n, width, key, <unsigned char*> PyByteArray_AS_STRING(wide))
    return find_row(first, n, width, key, pad)
