/* jinja unicode: Python's str case conversions (lower, upper, title, capitalize, swapcase) with full case
 * mappings and the final sigma rule, and the character classes Python's str predicates use. Simple mappings and
 * categories come from utf8proc; the mappings that expand to several code points are in the table below. */
#include "tokenizer/jinja.h"

#include <string.h>

#include <utf8proc.h>

#include "core/core.h"

/* Unicode SpecialCasing.txt unconditional mappings that expand to several code points (Unicode 14, as in
 * CPython 3.11): code point, full uppercase, full lowercase, full titlecase ("" = the simple mapping). */
static const struct special_case {
    uint32_t cp;
    const char *upper, *lower, *title;
} special_cases[] = {
    {0x00DF, "\x53\x53", "", "\x53\x73"},
    {0x0130, "", "\x69\xcc\x87", ""},
    {0x0149, "\xca\xbc\x4e", "", "\xca\xbc\x4e"},
    {0x01F0, "\x4a\xcc\x8c", "", "\x4a\xcc\x8c"},
    {0x0390, "\xce\x99\xcc\x88\xcc\x81", "", "\xce\x99\xcc\x88\xcc\x81"},
    {0x03B0, "\xce\xa5\xcc\x88\xcc\x81", "", "\xce\xa5\xcc\x88\xcc\x81"},
    {0x0587, "\xd4\xb5\xd5\x92", "", "\xd4\xb5\xd6\x82"},
    {0x1E96, "\x48\xcc\xb1", "", "\x48\xcc\xb1"},
    {0x1E97, "\x54\xcc\x88", "", "\x54\xcc\x88"},
    {0x1E98, "\x57\xcc\x8a", "", "\x57\xcc\x8a"},
    {0x1E99, "\x59\xcc\x8a", "", "\x59\xcc\x8a"},
    {0x1E9A, "\x41\xca\xbe", "", "\x41\xca\xbe"},
    {0x1F50, "\xce\xa5\xcc\x93", "", "\xce\xa5\xcc\x93"},
    {0x1F52, "\xce\xa5\xcc\x93\xcc\x80", "", "\xce\xa5\xcc\x93\xcc\x80"},
    {0x1F54, "\xce\xa5\xcc\x93\xcc\x81", "", "\xce\xa5\xcc\x93\xcc\x81"},
    {0x1F56, "\xce\xa5\xcc\x93\xcd\x82", "", "\xce\xa5\xcc\x93\xcd\x82"},
    {0x1F80, "\xe1\xbc\x88\xce\x99", "", ""},
    {0x1F81, "\xe1\xbc\x89\xce\x99", "", ""},
    {0x1F82, "\xe1\xbc\x8a\xce\x99", "", ""},
    {0x1F83, "\xe1\xbc\x8b\xce\x99", "", ""},
    {0x1F84, "\xe1\xbc\x8c\xce\x99", "", ""},
    {0x1F85, "\xe1\xbc\x8d\xce\x99", "", ""},
    {0x1F86, "\xe1\xbc\x8e\xce\x99", "", ""},
    {0x1F87, "\xe1\xbc\x8f\xce\x99", "", ""},
    {0x1F88, "\xe1\xbc\x88\xce\x99", "", ""},
    {0x1F89, "\xe1\xbc\x89\xce\x99", "", ""},
    {0x1F8A, "\xe1\xbc\x8a\xce\x99", "", ""},
    {0x1F8B, "\xe1\xbc\x8b\xce\x99", "", ""},
    {0x1F8C, "\xe1\xbc\x8c\xce\x99", "", ""},
    {0x1F8D, "\xe1\xbc\x8d\xce\x99", "", ""},
    {0x1F8E, "\xe1\xbc\x8e\xce\x99", "", ""},
    {0x1F8F, "\xe1\xbc\x8f\xce\x99", "", ""},
    {0x1F90, "\xe1\xbc\xa8\xce\x99", "", ""},
    {0x1F91, "\xe1\xbc\xa9\xce\x99", "", ""},
    {0x1F92, "\xe1\xbc\xaa\xce\x99", "", ""},
    {0x1F93, "\xe1\xbc\xab\xce\x99", "", ""},
    {0x1F94, "\xe1\xbc\xac\xce\x99", "", ""},
    {0x1F95, "\xe1\xbc\xad\xce\x99", "", ""},
    {0x1F96, "\xe1\xbc\xae\xce\x99", "", ""},
    {0x1F97, "\xe1\xbc\xaf\xce\x99", "", ""},
    {0x1F98, "\xe1\xbc\xa8\xce\x99", "", ""},
    {0x1F99, "\xe1\xbc\xa9\xce\x99", "", ""},
    {0x1F9A, "\xe1\xbc\xaa\xce\x99", "", ""},
    {0x1F9B, "\xe1\xbc\xab\xce\x99", "", ""},
    {0x1F9C, "\xe1\xbc\xac\xce\x99", "", ""},
    {0x1F9D, "\xe1\xbc\xad\xce\x99", "", ""},
    {0x1F9E, "\xe1\xbc\xae\xce\x99", "", ""},
    {0x1F9F, "\xe1\xbc\xaf\xce\x99", "", ""},
    {0x1FA0, "\xe1\xbd\xa8\xce\x99", "", ""},
    {0x1FA1, "\xe1\xbd\xa9\xce\x99", "", ""},
    {0x1FA2, "\xe1\xbd\xaa\xce\x99", "", ""},
    {0x1FA3, "\xe1\xbd\xab\xce\x99", "", ""},
    {0x1FA4, "\xe1\xbd\xac\xce\x99", "", ""},
    {0x1FA5, "\xe1\xbd\xad\xce\x99", "", ""},
    {0x1FA6, "\xe1\xbd\xae\xce\x99", "", ""},
    {0x1FA7, "\xe1\xbd\xaf\xce\x99", "", ""},
    {0x1FA8, "\xe1\xbd\xa8\xce\x99", "", ""},
    {0x1FA9, "\xe1\xbd\xa9\xce\x99", "", ""},
    {0x1FAA, "\xe1\xbd\xaa\xce\x99", "", ""},
    {0x1FAB, "\xe1\xbd\xab\xce\x99", "", ""},
    {0x1FAC, "\xe1\xbd\xac\xce\x99", "", ""},
    {0x1FAD, "\xe1\xbd\xad\xce\x99", "", ""},
    {0x1FAE, "\xe1\xbd\xae\xce\x99", "", ""},
    {0x1FAF, "\xe1\xbd\xaf\xce\x99", "", ""},
    {0x1FB2, "\xe1\xbe\xba\xce\x99", "", "\xe1\xbe\xba\xcd\x85"},
    {0x1FB3, "\xce\x91\xce\x99", "", ""},
    {0x1FB4, "\xce\x86\xce\x99", "", "\xce\x86\xcd\x85"},
    {0x1FB6, "\xce\x91\xcd\x82", "", "\xce\x91\xcd\x82"},
    {0x1FB7, "\xce\x91\xcd\x82\xce\x99", "", "\xce\x91\xcd\x82\xcd\x85"},
    {0x1FBC, "\xce\x91\xce\x99", "", ""},
    {0x1FC2, "\xe1\xbf\x8a\xce\x99", "", "\xe1\xbf\x8a\xcd\x85"},
    {0x1FC3, "\xce\x97\xce\x99", "", ""},
    {0x1FC4, "\xce\x89\xce\x99", "", "\xce\x89\xcd\x85"},
    {0x1FC6, "\xce\x97\xcd\x82", "", "\xce\x97\xcd\x82"},
    {0x1FC7, "\xce\x97\xcd\x82\xce\x99", "", "\xce\x97\xcd\x82\xcd\x85"},
    {0x1FCC, "\xce\x97\xce\x99", "", ""},
    {0x1FD2, "\xce\x99\xcc\x88\xcc\x80", "", "\xce\x99\xcc\x88\xcc\x80"},
    {0x1FD3, "\xce\x99\xcc\x88\xcc\x81", "", "\xce\x99\xcc\x88\xcc\x81"},
    {0x1FD6, "\xce\x99\xcd\x82", "", "\xce\x99\xcd\x82"},
    {0x1FD7, "\xce\x99\xcc\x88\xcd\x82", "", "\xce\x99\xcc\x88\xcd\x82"},
    {0x1FE2, "\xce\xa5\xcc\x88\xcc\x80", "", "\xce\xa5\xcc\x88\xcc\x80"},
    {0x1FE3, "\xce\xa5\xcc\x88\xcc\x81", "", "\xce\xa5\xcc\x88\xcc\x81"},
    {0x1FE4, "\xce\xa1\xcc\x93", "", "\xce\xa1\xcc\x93"},
    {0x1FE6, "\xce\xa5\xcd\x82", "", "\xce\xa5\xcd\x82"},
    {0x1FE7, "\xce\xa5\xcc\x88\xcd\x82", "", "\xce\xa5\xcc\x88\xcd\x82"},
    {0x1FF2, "\xe1\xbf\xba\xce\x99", "", "\xe1\xbf\xba\xcd\x85"},
    {0x1FF3, "\xce\xa9\xce\x99", "", ""},
    {0x1FF4, "\xce\x8f\xce\x99", "", "\xce\x8f\xcd\x85"},
    {0x1FF6, "\xce\xa9\xcd\x82", "", "\xce\xa9\xcd\x82"},
    {0x1FF7, "\xce\xa9\xcd\x82\xce\x99", "", "\xce\xa9\xcd\x82\xcd\x85"},
    {0x1FFC, "\xce\xa9\xce\x99", "", ""},
    {0xFB00, "\x46\x46", "", "\x46\x66"},
    {0xFB01, "\x46\x49", "", "\x46\x69"},
    {0xFB02, "\x46\x4c", "", "\x46\x6c"},
    {0xFB03, "\x46\x46\x49", "", "\x46\x66\x69"},
    {0xFB04, "\x46\x46\x4c", "", "\x46\x66\x6c"},
    {0xFB05, "\x53\x54", "", "\x53\x74"},
    {0xFB06, "\x53\x54", "", "\x53\x74"},
    {0xFB13, "\xd5\x84\xd5\x86", "", "\xd5\x84\xd5\xb6"},
    {0xFB14, "\xd5\x84\xd4\xb5", "", "\xd5\x84\xd5\xa5"},
    {0xFB15, "\xd5\x84\xd4\xbb", "", "\xd5\x84\xd5\xab"},
    {0xFB16, "\xd5\x8e\xd5\x86", "", "\xd5\x8e\xd5\xb6"},
    {0xFB17, "\xd5\x84\xd4\xbd", "", "\xd5\x84\xd5\xad"},
};

static const struct special_case *special(uint32_t cp)
{
    size_t lo = 0, hi = ST_ARRAY_LEN(special_cases);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (special_cases[mid].cp == cp) return &special_cases[mid];
        if (special_cases[mid].cp < cp) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

static utf8proc_category_t category(uint32_t cp) { return utf8proc_category((utf8proc_int32_t)cp); }

static bool jinja_cp_is_cased(uint32_t cp)
{
    utf8proc_category_t c = category(cp);
    return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
}

bool jinja_cp_is_alpha(uint32_t cp)
{
    utf8proc_category_t c = category(cp);
    return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}

bool jinja_cp_is_numeric(uint32_t cp)
{
    utf8proc_category_t c = category(cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

bool jinja_cp_is_decimal(uint32_t cp) { return category(cp) == UTF8PROC_CATEGORY_ND; }

static bool case_ignorable(uint32_t cp)
{
    switch (category(cp)) {
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_SK: return true;
    default:
        return cp == 0x27 || cp == 0x2E || cp == 0x3A || cp == 0x5E || cp == 0x60 || cp == 0xA8 || cp == 0xAD ||
               cp == 0xAF || cp == 0xB4 || cp == 0xB7 || cp == 0xB8 || cp == 0x2018 || cp == 0x2019 ||
               cp == 0x2024 || cp == 0x2027 || cp == 0xFE13 || cp == 0xFE52 || cp == 0xFE55 || cp == 0xFF07 ||
               cp == 0xFF0E || cp == 0xFF1A;
    }
}

static uint32_t prev_cp(const char *s, size_t *i)
{
    size_t b = *i - 1;
    while (b > 0 && ((unsigned char)s[b] & 0xC0) == 0x80) b--;
    size_t adv;
    uint32_t cp = jinja_utf8_decode(s + b, *i - b, &adv);
    *i = b;
    return cp;
}

/* CPython's handle_capital_sigma: U+03A3 at byte i of s lowercases to final sigma at the end of a word. */
static bool final_sigma(const char *s, size_t len, size_t i, size_t adv)
{
    size_t j = i;
    uint32_t c = 0;
    bool found = false;
    while (j > 0) {
        c = prev_cp(s, &j);
        if (!case_ignorable(c)) {
            found = true;
            break;
        }
    }
    if (!found || !jinja_cp_is_cased(c)) return false;
    j = i + adv;
    while (j < len) {
        size_t a;
        c = jinja_utf8_decode(s + j, len - j, &a);
        if (!case_ignorable(c)) return !jinja_cp_is_cased(c);
        j += a;
    }
    return true;
}

enum cmap { CM_LOWER, CM_UPPER, CM_TITLE };

/* Appends the full mapping of the code point at byte i (of adv bytes) of s. */
static int put_mapped(struct jbuf *b, const char *s, size_t len, size_t i, size_t adv, uint32_t cp, enum cmap m)
{
    const struct special_case *sc = cp >= 0xDF ? special(cp) : NULL;
    if (sc) {
        const char *x = m == CM_UPPER ? sc->upper : m == CM_LOWER ? sc->lower : sc->title;
        if (x[0]) return jbuf_put(b, x, strlen(x));
    }
    uint32_t o;
    if (cp < 0x80) {
        o = cp;
        if (m == CM_LOWER && cp >= 'A' && cp <= 'Z') o = cp + 32;
        if (m != CM_LOWER && cp >= 'a' && cp <= 'z') o = cp - 32;
    } else if (m == CM_LOWER) {
        o = cp == 0x3A3 ? (final_sigma(s, len, i, adv) ? 0x3C2 : 0x3C3) : (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp);
    } else if (m == CM_UPPER) {
        o = (uint32_t)utf8proc_toupper((utf8proc_int32_t)cp);
    } else {
        o = (uint32_t)utf8proc_totitle((utf8proc_int32_t)cp);
    }
    char tmp[4];
    return jbuf_put(b, tmp, jinja_utf8_encode(o, tmp));
}

int jinja_case_append(struct jbuf *b, const char *s, size_t len, enum jinja_case mode)
{
    bool prev_cased = false, word_start = true;
    size_t i = 0, word = 0; /* JCASE_TITLE_FILTER: byte offset where the current word's rest begins */
    int rc = 0, idx = 0;
    while (i < len && rc == 0) {
        size_t adv;
        uint32_t cp = jinja_utf8_decode(s + i, len - i, &adv);
        switch (mode) {
        case JCASE_LOWER: rc = put_mapped(b, s, len, i, adv, cp, CM_LOWER); break;
        case JCASE_UPPER: rc = put_mapped(b, s, len, i, adv, cp, CM_UPPER); break;
        case JCASE_TITLE:
            rc = put_mapped(b, s, len, i, adv, cp, prev_cased ? CM_LOWER : CM_TITLE);
            prev_cased = jinja_cp_is_cased(cp);
            break;
        case JCASE_CAPITALIZE: rc = put_mapped(b, s, len, i, adv, cp, idx == 0 ? CM_TITLE : CM_LOWER); break;
        case JCASE_SWAPCASE: {
            utf8proc_category_t c = category(cp);
            if (c == UTF8PROC_CATEGORY_LU) rc = put_mapped(b, s, len, i, adv, cp, CM_LOWER);
            else if (c == UTF8PROC_CATEGORY_LL) rc = put_mapped(b, s, len, i, adv, cp, CM_UPPER);
            else rc = jbuf_put(b, s + i, adv);
            break;
        }
        case JCASE_TITLE_FILTER: {
            /* jinja2: re.split(r"([-\s({\[<]+)"), then item[0].upper() + item[1:].lower() per item */
            bool sep = cp == '-' || cp == '(' || cp == '{' || cp == '[' || cp == '<' || jinja_py_isspace(cp);
            if (sep) {
                rc = jbuf_put(b, s + i, adv);
                word_start = true;
            } else if (word_start) {
                rc = put_mapped(b, s, len, i, adv, cp, CM_UPPER);
                word_start = false;
                word = i + adv;
            } else {
                /* the rest of the word is lowercased as its own string (final sigma looks only inside it) */
                size_t end = i;
                while (end < len) {
                    size_t a2;
                    uint32_t c2 = jinja_utf8_decode(s + end, len - end, &a2);
                    if (c2 == '-' || c2 == '(' || c2 == '{' || c2 == '[' || c2 == '<' || jinja_py_isspace(c2)) break;
                    end += a2;
                }
                rc = put_mapped(b, s + word, end - word, i - word, adv, cp, CM_LOWER);
            }
            break;
        }
        }
        i += adv;
        idx++;
    }
    return rc;
}
