/* tok_unicode: UTF-8 decoding and validation, the Unicode classes the reference uses (Rust's char methods and
 * regex classes), Rust's lossy UTF-8 decoding, normalization forms (utf8proc) and the GPT-2 byte table. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer/tok_internal.h"

int tok_buf_reserve(struct tok_buf *b, size_t extra)
{
    if (extra > SIZE_MAX / 2 - b->n) return ST_ENOMEM;
    size_t need = b->n + extra + 1;
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return ST_ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

int tok_buf_put(struct tok_buf *b, const void *s, size_t n)
{
    /* s may point into b itself (copying a piece of the work buffer onto its end) */
    const char *cs = s;
    bool inside = b->p && cs >= b->p && cs < b->p + b->cap;
    size_t rel = inside ? (size_t)(cs - b->p) : 0;
    if (tok_buf_reserve(b, n) < 0) return ST_ENOMEM;
    if (inside) cs = b->p + rel;
    if (n) memmove(b->p + b->n, cs, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

void tok_buf_free(struct tok_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

int32_t tok_utf8_decode(const unsigned char *s, size_t n, int *len)
{
    unsigned c = s[0];
    *len = 1;
    if (c < 0x80) return (int32_t)c;
    int need;
    uint32_t cp;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        cp = c & 0x0F;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        cp = c & 0x07;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return -1;
    }
    if ((size_t)need >= n) return -1;
    for (int i = 1; i <= need; i++) {
        unsigned d = s[i];
        if (d < lo || d > hi) return -1;
        lo = 0x80;
        hi = 0xBF;
        cp = (cp << 6) | (d & 0x3F);
    }
    *len = need + 1;
    return (int32_t)cp;
}

size_t tok_utf8_valid_prefix(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int len;
        if (tok_utf8_decode(s + i, n - i, &len) < 0) return i;
        i += (size_t)len;
    }
    return n;
}

int tok_utf8_encode(uint32_t cp, char out[4])
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

bool tok_is_whitespace(uint32_t cp)
{
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
    switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}

bool tok_is_word(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9') || cp == '_';
    if (cp == 0x200C || cp == 0x200D) return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

bool tok_is_numeric(uint32_t cp)
{
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

bool tok_is_punct(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= 0x21 && cp <= 0x2F) || (cp >= 0x3A && cp <= 0x40) || (cp >= 0x5B && cp <= 0x60) ||
               (cp >= 0x7B && cp <= 0x7E);
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_PC: case UTF8PROC_CATEGORY_PD: case UTF8PROC_CATEGORY_PS: case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI: case UTF8PROC_CATEGORY_PF: case UTF8PROC_CATEGORY_PO:
        return true;
    default:
        return false;
    }
}

bool tok_is_mark_nonspacing(uint32_t cp)
{
    return cp >= 0x300 && utf8proc_category((utf8proc_int32_t)cp) == UTF8PROC_CATEGORY_MN;
}

static size_t put_fffd(char *out)
{
    out[0] = (char)0xEF;
    out[1] = (char)0xBF;
    out[2] = (char)0xBD;
    return 3;
}

size_t tok_lossy_push(struct detok_utf8 *l, unsigned char c, char *out)
{
    size_t w = 0;
    if (l->n) {
        if (c >= l->lo && c <= l->hi) {
            l->b[l->n++] = c;
            l->lo = 0x80;
            l->hi = 0xBF;
            if (--l->need == 0) {
                memcpy(out, l->b, l->n);
                w = l->n;
                l->n = 0;
            }
            return w;
        }
        /* the held bytes are a maximal invalid subpart; c starts afresh */
        w = put_fffd(out);
        l->n = 0;
    }
    if (c < 0x80) {
        out[w++] = (char)c;
        return w;
    }
    l->lo = 0x80;
    l->hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        l->need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        l->need = 2;
        if (c == 0xE0) l->lo = 0xA0;
        if (c == 0xED) l->hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        l->need = 3;
        if (c == 0xF0) l->lo = 0x90;
        if (c == 0xF4) l->hi = 0x8F;
    } else {
        return w + put_fffd(out + w);
    }
    l->b[0] = c;
    l->n = 1;
    return w;
}

size_t tok_lossy_finish(struct detok_utf8 *l, char *out)
{
    if (!l->n) return 0;
    l->n = 0;
    return put_fffd(out);
}

int tok_utf8v_push(struct detok_utf8 *l, unsigned char c)
{
    if (l->n) {
        if (c < l->lo || c > l->hi) return -1;
        l->lo = 0x80;
        l->hi = 0xBF;
        if (--l->need == 0) l->n = 0;
        else l->n++;
        return 0;
    }
    if (c < 0x80) return 0;
    l->lo = 0x80;
    l->hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) l->need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        l->need = 2;
        if (c == 0xE0) l->lo = 0xA0;
        if (c == 0xED) l->hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        l->need = 3;
        if (c == 0xF0) l->lo = 0x90;
        if (c == 0xF4) l->hi = 0x8F;
    } else {
        return -1;
    }
    l->n = 1;
    return 0;
}

int tok_normalize_form(enum tok_nf form, const char *s, size_t n, char **out, size_t *out_len, char *err)
{
    *out = NULL;
    *out_len = 0;
    int opts = UTF8PROC_STABLE;
    switch (form) {
    case TOK_NF_NFC: opts |= UTF8PROC_COMPOSE; break;
    case TOK_NF_NFD: opts |= UTF8PROC_DECOMPOSE; break;
    case TOK_NF_NFKC: opts |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case TOK_NF_NFKD: opts |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
    default: return err_set(err, ST_EINVAL, "bad normalization form %d", (int)form);
    }
    if (n > TOK_MAX_INPUT * 4) return err_set(err, ST_ERANGE, "text too long to normalize");
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst, (utf8proc_option_t)opts);
    if (r < 0) return err_set(err, r == UTF8PROC_ERROR_NOMEM ? ST_ENOMEM : ST_EINVAL, "normalization failed: %s",
                              utf8proc_errmsg(r));
    *out = (char *)dst;
    *out_len = (size_t)r;
    return 0;
}

const uint16_t tok_byte_to_cp[256] = {
    0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10a, 0x10b, 0x10c, 0x10d, 0x10e, 0x10f,
    0x110, 0x111, 0x112, 0x113, 0x114, 0x115, 0x116, 0x117, 0x118, 0x119, 0x11a, 0x11b, 0x11c, 0x11d, 0x11e, 0x11f,
    0x120, 0x021, 0x022, 0x023, 0x024, 0x025, 0x026, 0x027, 0x028, 0x029, 0x02a, 0x02b, 0x02c, 0x02d, 0x02e, 0x02f,
    0x030, 0x031, 0x032, 0x033, 0x034, 0x035, 0x036, 0x037, 0x038, 0x039, 0x03a, 0x03b, 0x03c, 0x03d, 0x03e, 0x03f,
    0x040, 0x041, 0x042, 0x043, 0x044, 0x045, 0x046, 0x047, 0x048, 0x049, 0x04a, 0x04b, 0x04c, 0x04d, 0x04e, 0x04f,
    0x050, 0x051, 0x052, 0x053, 0x054, 0x055, 0x056, 0x057, 0x058, 0x059, 0x05a, 0x05b, 0x05c, 0x05d, 0x05e, 0x05f,
    0x060, 0x061, 0x062, 0x063, 0x064, 0x065, 0x066, 0x067, 0x068, 0x069, 0x06a, 0x06b, 0x06c, 0x06d, 0x06e, 0x06f,
    0x070, 0x071, 0x072, 0x073, 0x074, 0x075, 0x076, 0x077, 0x078, 0x079, 0x07a, 0x07b, 0x07c, 0x07d, 0x07e, 0x121,
    0x122, 0x123, 0x124, 0x125, 0x126, 0x127, 0x128, 0x129, 0x12a, 0x12b, 0x12c, 0x12d, 0x12e, 0x12f, 0x130, 0x131,
    0x132, 0x133, 0x134, 0x135, 0x136, 0x137, 0x138, 0x139, 0x13a, 0x13b, 0x13c, 0x13d, 0x13e, 0x13f, 0x140, 0x141,
    0x142, 0x0a1, 0x0a2, 0x0a3, 0x0a4, 0x0a5, 0x0a6, 0x0a7, 0x0a8, 0x0a9, 0x0aa, 0x0ab, 0x0ac, 0x143, 0x0ae, 0x0af,
    0x0b0, 0x0b1, 0x0b2, 0x0b3, 0x0b4, 0x0b5, 0x0b6, 0x0b7, 0x0b8, 0x0b9, 0x0ba, 0x0bb, 0x0bc, 0x0bd, 0x0be, 0x0bf,
    0x0c0, 0x0c1, 0x0c2, 0x0c3, 0x0c4, 0x0c5, 0x0c6, 0x0c7, 0x0c8, 0x0c9, 0x0ca, 0x0cb, 0x0cc, 0x0cd, 0x0ce, 0x0cf,
    0x0d0, 0x0d1, 0x0d2, 0x0d3, 0x0d4, 0x0d5, 0x0d6, 0x0d7, 0x0d8, 0x0d9, 0x0da, 0x0db, 0x0dc, 0x0dd, 0x0de, 0x0df,
    0x0e0, 0x0e1, 0x0e2, 0x0e3, 0x0e4, 0x0e5, 0x0e6, 0x0e7, 0x0e8, 0x0e9, 0x0ea, 0x0eb, 0x0ec, 0x0ed, 0x0ee, 0x0ef,
    0x0f0, 0x0f1, 0x0f2, 0x0f3, 0x0f4, 0x0f5, 0x0f6, 0x0f7, 0x0f8, 0x0f9, 0x0fa, 0x0fb, 0x0fc, 0x0fd, 0x0fe, 0x0ff,
};

int tok_cp_to_byte(uint32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF)) return (int)cp;
    if (cp < 0x100 || cp > 0x143) return -1;
    uint32_t i = cp - 0x100; /* the 68 unprintable bytes, in order */
    if (i < 33) return (int)i;
    if (i < 67) return (int)(0x7F + (i - 33));
    return 0xAD;
}
