/* The compiled twin of _pure.py: Redis 7.0's stringmatchlen (util.c stringmatchlen_impl), byte for
 * byte, with skipLongerMatches and the nesting limit of CVE-2022-36021.
 *
 * Differences from util.c, none visible in the answer:
 * - every read is bounded by the lengths (util.c reads the NUL after an sds where the length is 0 or
 *   1: "pattern[1] == '*'", "*pattern == '*'"; a NUL is never '*', '^' or ']', so testing the length
 *   instead gives the same answer for any bytes, NUL included);
 * - a '*' followed by plain bytes tries only the positions where they are (memmem; with nocase, where
 *   the first is): at any other position the nested call would fail on one of them, or run out of
 *   string before them, without touching skipLongerMatches;
 * - large inputs are matched without the GIL: the arguments are bytes objects (immutable) that the
 *   call holds a reference to. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_NESTING 1000
/* Inputs at least this long are matched with the GIL released (the release costs far less). */
#ifndef RELEASE_GIL_BYTES
#define RELEASE_GIL_BYTES (16 * 1024)
#endif

static inline int c_lower(int c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

static inline int plain_byte(unsigned char c) { return c != '*' && c != '?' && c != '[' && c != '\\'; }

/* The first position in s where the byte c (folded with nocase) is, or NULL. */
static const unsigned char *next_candidate(const unsigned char *s, Py_ssize_t slen, unsigned char c, int nocase)
{
    unsigned char lo = c | 0x20;
    if (!nocase || lo < 'a' || lo > 'z') return memchr(s, c, (size_t)slen);
    for (Py_ssize_t i = 0; i < slen; i++)
        if (c_lower(s[i]) == lo) return s + i;
    return NULL;
}

static int match_impl(const unsigned char *p, Py_ssize_t plen, const unsigned char *s, Py_ssize_t slen,
                      int nocase, int *skipLongerMatches, int nesting)
{
    if (nesting > MAX_NESTING) return 0;
    while (plen && slen) {
        switch (p[0]) {
        case '*': {
            while (plen > 1 && p[1] == '*') {
                p++;
                plen--;
            }
            if (plen == 1) return 1;
            /* the run of plain bytes after the '*' */
            Py_ssize_t run = 0;
            while (run < plen - 1 && plain_byte(p[1 + run])) run++;
            while (slen) {
                if (run) {
                    const unsigned char *at = nocase ? next_candidate(s, slen, p[1], nocase)
                                                     : memmem(s, (size_t)slen, p + 1, (size_t)run);
                    if (at == NULL) break;
                    slen -= at - s;
                    s = at;
                }
                if (match_impl(p + 1, plen - 1, s, slen, nocase, skipLongerMatches, nesting + 1)) return 1;
                if (*skipLongerMatches) return 0;
                s++;
                slen--;
            }
            *skipLongerMatches = 1;
            return 0;
        }
        case '?':
            s++;
            slen--;
            break;
        case '[': {
            int not, match = 0;
            p++;
            plen--;
            not = plen && p[0] == '^';
            if (not) {
                p++;
                plen--;
            }
            for (;;) {
                if (plen >= 2 && p[0] == '\\') {
                    p++;
                    plen--;
                    if (p[0] == s[0]) match = 1;
                } else if (plen && p[0] == ']') {
                    break;
                } else if (plen == 0) {
                    p--;
                    plen++;
                    break;
                } else if (plen >= 3 && p[1] == '-') {
                    /* char is signed in Redis's build: compare as signed char */
                    int start = (signed char)p[0], end = (signed char)p[2], c = (signed char)s[0];
                    if (start > end) {
                        int t = start;
                        start = end;
                        end = t;
                    }
                    if (nocase) {
                        start = c_lower(start);
                        end = c_lower(end);
                        c = c_lower(c);
                    }
                    p += 2;
                    plen -= 2;
                    if (c >= start && c <= end) match = 1;
                } else if (!nocase ? p[0] == s[0] : c_lower(p[0]) == c_lower(s[0])) {
                    match = 1;
                }
                p++;
                plen--;
            }
            if (not) match = !match;
            if (!match) return 0;
            s++;
            slen--;
            break;
        }
        case '\\':
            if (plen >= 2) {
                p++;
                plen--;
            }
            /* fall through */
        default:
            if (!nocase ? p[0] != s[0] : c_lower(p[0]) != c_lower(s[0])) return 0;
            s++;
            slen--;
            break;
        }
        p++;
        plen--;
        if (slen == 0) {
            while (plen && p[0] == '*') {
                p++;
                plen--;
            }
            break;
        }
    }
    return plen == 0 && slen == 0;
}

static int match(const char *p, Py_ssize_t plen, const char *s, Py_ssize_t slen, int nocase)
{
    int skip = 0, r;
    if (plen + slen >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = match_impl((const unsigned char *)p, plen, (const unsigned char *)s, slen, nocase, &skip, 0);
        Py_END_ALLOW_THREADS
    } else {
        r = match_impl((const unsigned char *)p, plen, (const unsigned char *)s, slen, nocase, &skip, 0);
    }
    return r;
}

/* Positional (pattern, string[, nocase]) or nocase= as a keyword; bytes only (immutable, so safe to
 * read without the GIL). */
static int parse(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname, int *nocase)
{
    PyObject *flag = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw < 2 || nargs + nkw > 3 || nargs < 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes (pattern, string, nocase=False)", fname);
        return -1;
    }
    if (nargs == 3) flag = args[2];
    if (nkw) {
        if (nargs == 3 || !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "nocase") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument", fname);
            return -1;
        }
        flag = args[2];
    }
    if (!PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "%s() arguments must be bytes", fname);
        return -1;
    }
    *nocase = 0;
    if (flag != NULL && (*nocase = PyObject_IsTrue(flag)) < 0) return -1;
    return 0;
}

static PyObject *py_stringmatchlen(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int nocase;
    (void)self;
    if (parse(args, nargs, kwnames, "stringmatchlen", &nocase) < 0) return NULL;
    if (match(PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]), PyBytes_AS_STRING(args[1]),
              PyBytes_GET_SIZE(args[1]), nocase))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* ---------------------------------------------------------------------------------------------
 * Reply frames: the twin of _pure.py's whole_frames and ReplyScanner, byte for byte.
 *
 * Every index is checked against the buffer's length before it is read. A declared length is read as
 * Python's int() reads bytes: plain digits (an optional '-', at most 18 digits) here, anything else
 * (whitespace, '+', '_', more digits, nothing) by int() itself, so a malformed one raises the same
 * ValueError. Its value is then clamped to +-LEN_CAP: a length that large can never be reached the end
 * of (no stream has 2^61 bytes), so it stays pending exactly as the pure twin's unbounded int does,
 * and the sums below cannot overflow. */

static PyObject *ProtocolError; /* redisguard.protocol.resp.ProtocolError */

#define LEN_CAP ((long long)1 << 61)
#define REPLY_HEADER_MAX ((Py_ssize_t)64 * 1024 * 16) /* PROTO_INLINE_MAX_SIZE * 16 */

static int read_length(const char *s, Py_ssize_t len, long long *out)
{
    Py_ssize_t i = (len > 0 && s[0] == '-') ? 1 : 0;
    long long v = 0;
    if (i < len && len - i <= 18) {
        Py_ssize_t j = i;
        for (; j < len; j++) {
            unsigned d = (unsigned)(unsigned char)s[j] - '0';
            if (d > 9) break;
            v = v * 10 + d;
        }
        if (j == len) {
            v = i ? -v : v;
            goto clamp;
        }
    }
    {
        int overflow = 0;
        PyObject *b = PyBytes_FromStringAndSize(s, len), *n;
        if (b == NULL) return -1;
        n = PyNumber_Long(b);
        Py_DECREF(b);
        if (n == NULL) return -1;
        v = PyLong_AsLongLongAndOverflow(n, &overflow);
        Py_DECREF(n);
        if (overflow) v = overflow > 0 ? LEN_CAP : -LEN_CAP;
        else if (v == -1 && PyErr_Occurred()) return -1;
    }
clamp:
    *out = v > LEN_CAP ? LEN_CAP : v < -LEN_CAP ? -LEN_CAP : v;
    return 0;
}

/* The index of the first "\r\n" at or after pos, or -1 (bytes.find). */
static Py_ssize_t find_crlf(const char *s, Py_ssize_t n, Py_ssize_t pos)
{
    while (pos < n - 1) {
        const char *r = memchr(s + pos, '\r', (size_t)(n - 1 - pos));
        if (r == NULL) return -1;
        pos = r - s;
        if (s[pos + 1] == '\n') return pos;
        pos++;
    }
    return -1;
}

static PyObject *py_whole_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *s;
    Py_ssize_t n, cr;
    long long pos = 0, count = 0, left = 0, size, limit;
    int overflow;
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "whole_frames() takes (buf: bytes, limit: int)");
        return NULL;
    }
    limit = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (overflow) limit = overflow > 0 ? LLONG_MAX : LLONG_MIN; /* never reached either way */
    else if (limit == -1 && PyErr_Occurred()) return NULL;
    s = PyBytes_AS_STRING(args[0]);
    n = PyBytes_GET_SIZE(args[0]);
    while (pos < n) {
        unsigned char t = (unsigned char)s[pos];
        cr = find_crlf(s, n, (Py_ssize_t)pos);
        if (cr < 0) return PyLong_FromLong(-1);
        if (t == '$') { /* cr > pos: s[pos] is not '\r' */
            if (read_length(s + pos + 1, cr - (Py_ssize_t)pos - 1, &size) < 0) return NULL;
            pos = size < 0 ? cr + 2 : cr + size + 4;
        } else if (t == '+' || t == '-' || t == ':') {
            pos = cr + 2;
        } else if (t == '*' && !left) {
            if (read_length(s + pos + 1, cr - (Py_ssize_t)pos - 1, &size) < 0) return NULL;
            left = size > 0 ? size : 0;
            pos = cr + 2;
            if (left) continue;
        } else {
            return PyLong_FromLong(-1);
        }
        if (left && --left) continue;
        if (count == limit) return PyLong_FromLong(-1);
        count++;
    }
    return PyLong_FromLongLong(pos == n && !left ? count : -1);
}

typedef struct {
    PyObject_HEAD
    long long skip;     /* bytes of a bulk body (+CRLF) still to pass over */
    long long *stack;   /* remaining elements of each open aggregate */
    Py_ssize_t depth, cap;
    int top_kind;
    int want_first;
    PyObject *first;    /* first element of the top aggregate, or NULL (None) */
} Scanner;

static inline int agg_mult(unsigned char t)
{
    return (t == '*' || t == '>' || t == '~') ? 1 : (t == '%' || t == '|') ? 2 : 0;
}

static inline int is_line(unsigned char t)
{
    return t == '+' || t == '-' || t == ':' || t == ',' || t == '_' || t == '#' || t == '(';
}

static int element_done(Scanner *sc, PyObject *frames, Py_ssize_t pos)
{
    PyObject *fr, *end, *kind;
    int r;
    if (sc->depth == 1) sc->want_first = 0;
    while (sc->depth) {
        if (--sc->stack[sc->depth - 1]) return 0;
        sc->depth--;
    }
    end = PyLong_FromSsize_t(pos);
    kind = PyLong_FromLong(sc->top_kind);
    fr = PyTuple_New(3);
    if (end == NULL || kind == NULL || fr == NULL) {
        Py_XDECREF(end);
        Py_XDECREF(kind);
        Py_XDECREF(fr);
        return -1;
    }
    PyTuple_SET_ITEM(fr, 0, end);
    PyTuple_SET_ITEM(fr, 1, kind);
    PyTuple_SET_ITEM(fr, 2, Py_NewRef(sc->first ? sc->first : Py_None));
    r = PyList_Append(frames, fr);
    Py_DECREF(fr);
    return r;
}

static int push(Scanner *sc, long long remaining)
{
    if (sc->depth == sc->cap) {
        Py_ssize_t cap = sc->cap ? sc->cap * 2 : 8;
        long long *stack = PyMem_Realloc(sc->stack, (size_t)cap * sizeof(long long));
        if (stack == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        sc->stack = stack;
        sc->cap = cap;
    }
    sc->stack[sc->depth++] = remaining;
    return 0;
}

static PyObject *scanner_scan(Scanner *sc, PyObject *arg)
{
    const char *s;
    Py_ssize_t n, pos = 0, cr;
    long long size;
    PyObject *frames, *ch;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan() takes bytes");
        return NULL;
    }
    s = PyBytes_AS_STRING(arg);
    n = PyBytes_GET_SIZE(arg);
    if ((frames = PyList_New(0)) == NULL) return NULL;
    for (;;) {
        unsigned char t;
        int mult;
        if (sc->skip) {
            long long take = sc->skip < n - pos ? sc->skip : n - pos;
            sc->skip -= take;
            pos += (Py_ssize_t)take;
            if (sc->skip) break;
            if (element_done(sc, frames, pos) < 0) goto error;
            continue;
        }
        if (pos >= n) break;
        cr = find_crlf(s, n, pos);
        if (cr < 0) {
            if (n - pos > REPLY_HEADER_MAX) {
                PyErr_SetString(ProtocolError, "reply header line too long");
                goto error;
            }
            break;
        }
        t = (unsigned char)s[pos];
        mult = agg_mult(t);
        if (!sc->depth) {
            sc->top_kind = t;
            Py_CLEAR(sc->first);
            sc->want_first = mult != 0;
        }
        if (is_line(t)) {
            pos = cr + 2;
            if (element_done(sc, frames, pos) < 0) goto error;
        } else if (t == '$' || t == '=' || t == '!') {
            if (read_length(s + pos + 1, cr - pos - 1, &size) < 0) goto error;
            pos = cr + 2;
            if (size < 0) {
                if (element_done(sc, frames, pos) < 0) goto error;
            } else {
                if (sc->want_first && sc->depth == 1 && size <= 32 && pos + size <= n) {
                    PyObject *first = PyBytes_FromStringAndSize(s + pos, (Py_ssize_t)size);
                    if (first == NULL) goto error;
                    Py_XSETREF(sc->first, first);
                }
                sc->want_first = 0;
                sc->skip = size + 2;
            }
        } else if (mult) {
            if (read_length(s + pos + 1, cr - pos - 1, &size) < 0) goto error;
            pos = cr + 2;
            if (sc->depth) sc->want_first = 0;
            if (size <= 0) {
                if (element_done(sc, frames, pos) < 0) goto error;
            } else if (push(sc, size * mult) < 0) {
                goto error;
            }
        } else {
            if ((ch = PyUnicode_FromOrdinal(t)) != NULL) {
                PyErr_Format(ProtocolError, "unexpected reply type byte %R", ch);
                Py_DECREF(ch);
            }
            goto error;
        }
    }
    return Py_BuildValue("(Nn)", frames, pos);
error:
    Py_DECREF(frames);
    return NULL;
}

static PyObject *scanner_idle(Scanner *sc, void *closure)
{
    (void)closure;
    return PyBool_FromLong(!sc->depth && !sc->skip);
}

static PyObject *scanner_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "ReplyScanner() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0); /* zeroed: idle, no stack, first None */
}

static void scanner_dealloc(Scanner *sc)
{
    PyMem_Free(sc->stack);
    Py_XDECREF(sc->first);
    Py_TYPE(sc)->tp_free((PyObject *)sc);
}

static PyMethodDef scanner_methods[] = {
    {"scan", (PyCFunction)scanner_scan, METH_O,
     "scan(buf) -> (frames, consumed): the (end, kind, first) of each top-level frame that ends in buf."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef scanner_getset[] = {
    {"idle", (getter)scanner_idle, NULL, "True between frames.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "redisguard.fast._speedups.ReplyScanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Finds the ends of top-level reply frames in a byte stream without decoding it (twin of _pure.py's).",
    .tp_new = scanner_new,
    .tp_dealloc = (destructor)scanner_dealloc,
    .tp_methods = scanner_methods,
    .tp_getset = scanner_getset,
};

static PyMethodDef methods[] = {
    {"stringmatchlen", (PyCFunction)(void (*)(void))py_stringmatchlen, METH_FASTCALL | METH_KEYWORDS,
     "stringmatchlen(pattern, string, nocase=False) -> bool: Redis 7.0's glob match (util.c)."},
    {"whole_frames", (PyCFunction)(void (*)(void))py_whole_frames, METH_FASTCALL,
     "whole_frames(buf, limit) -> int: how many whole RESP2 replies buf is, or -1 (twin of _pure.py's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "The compiled kernel of redisguard (twin of _pure.py).", 0, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m, *resp;
    if (ProtocolError == NULL) {
        if ((resp = PyImport_ImportModule("redisguard.protocol.resp")) == NULL) return NULL;
        ProtocolError = PyObject_GetAttrString(resp, "ProtocolError");
        Py_DECREF(resp);
        if (ProtocolError == NULL) return NULL;
    }
    if (PyType_Ready(&ScannerType) < 0 || (m = PyModule_Create(&module)) == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_NESTING", MAX_NESTING) < 0 ||
        PyModule_AddIntConstant(m, "RELEASE_GIL_BYTES", RELEASE_GIL_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "REPLY_HEADER_MAX", REPLY_HEADER_MAX) < 0 ||
        PyModule_AddType(m, &ScannerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
