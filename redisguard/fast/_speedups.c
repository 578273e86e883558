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

static PyMethodDef methods[] = {
    {"stringmatchlen", (PyCFunction)(void (*)(void))py_stringmatchlen, METH_FASTCALL | METH_KEYWORDS,
     "stringmatchlen(pattern, string, nocase=False) -> bool: Redis 7.0's glob match (util.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "The compiled kernel of redisguard (twin of _pure.py).", 0, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "MAX_NESTING", MAX_NESTING) < 0 ||
                      PyModule_AddIntConstant(m, "RELEASE_GIL_BYTES", RELEASE_GIL_BYTES) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
