/* jinja lexer: jinja2's lexing rules with trim_blocks=True and lstrip_blocks=True (as Hugging Face configures
 * its environment), so that whitespace comes out byte for byte the same.
 *
 * The source is already newline-normalized (\r\n and \r became \n) with one trailing newline removed, as
 * jinja2's tokeniter does. Outside tags the text is data; "{{", "{%" and "{#" open a tag, optionally followed by
 * "-" (strip the whitespace before) or "+" (do not lstrip); "-}}", "-%}", "-#}" strip the whitespace after;
 * "%}" and "#}" eat one following newline (trim_blocks) unless written "+%}" / "+#}". lstrip_blocks removes
 * spaces and tabs between the start of a line and a block or comment tag.
 */
#include "tokenizer/jinja.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

struct lexer {
    const char *src;
    size_t len, pos;
    struct jtoken_list *out;
    char *err;
    /* position cursor for line/column */
    size_t loc_pos;
    int loc_line, loc_col;
    bool line_starting;
    /* open brackets inside the current tag */
    char brackets[JINJA_MAX_PARSE_DEPTH];
    int n_brackets;
};

static void locate(struct lexer *L, size_t pos, int *line, int *col)
{
    if (pos < L->loc_pos) {
        L->loc_pos = 0;
        L->loc_line = 1;
        L->loc_col = 1;
    }
    while (L->loc_pos < pos) {
        unsigned char ch = (unsigned char)L->src[L->loc_pos++];
        if (ch == '\n') {
            L->loc_line++;
            L->loc_col = 1;
        } else if ((ch & 0xC0) != 0x80) {
            L->loc_col++;
        }
    }
    *line = L->loc_line;
    *col = L->loc_col;
}

static int lex_fail(struct lexer *L, size_t pos, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int lex_fail(struct lexer *L, size_t pos, int code, const char *fmt, ...)
{
    int line, col;
    locate(L, pos, &line, &col);
    char msg[ST_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return err_set(L->err, code, "chat template line %d col %d: %s", line, col, msg);
}

static struct jtoken *emit(struct lexer *L, enum jtok_type type, size_t pos, size_t len)
{
    struct jtoken_list *t = L->out;
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 256;
        struct jtoken *nv = realloc(t->v, cap * sizeof(*nv));
        if (!nv) return NULL;
        t->v = nv;
        t->cap = cap;
    }
    struct jtoken *tok = &t->v[t->n++];
    memset(tok, 0, sizeof(*tok));
    tok->type = type;
    tok->s = L->src + pos;
    tok->len = len;
    locate(L, pos, &tok->line, &tok->col);
    return tok;
}

/* Length of the whitespace (Python's \s) at p, in bytes. */
static size_t space_run(const char *s, size_t len, size_t p)
{
    size_t q = p;
    while (q < len) {
        size_t adv;
        uint32_t cp = jinja_utf8_decode(s + q, len - q, &adv);
        if (!jinja_py_isspace(cp)) break;
        q += adv;
    }
    return q - p;
}

/* jinja2's OptionalLStrip: the text before a tag, given the tag's sign. Returns the kept length. */
static size_t strip_text(struct lexer *L, const char *text, size_t n, char sign, bool lstrip_ok)
{
    if (sign == '-') {
        size_t end = 0, q = 0;
        while (q < n) {
            size_t adv;
            uint32_t cp = jinja_utf8_decode(text + q, n - q, &adv);
            q += adv;
            if (!jinja_py_isspace(cp)) end = q;
        }
        return end;
    }
    if (sign == '+' || !lstrip_ok) return n;
    size_t l_pos = 0;
    for (size_t i = n; i > 0; i--) {
        if (text[i - 1] == '\n') {
            l_pos = i;
            break;
        }
    }
    if ((l_pos > 0 || L->line_starting) && n > l_pos && l_pos + space_run(text, n, l_pos) == n) return l_pos;
    return n;
}

static int emit_data(struct lexer *L, size_t pos, size_t n)
{
    if (n == 0) return 0;
    return emit(L, JT_DATA, pos, n) ? 0 : ST_ENOMEM;
}

static bool is_digit(char c) { return c >= '0' && c <= '9'; }
static bool is_name_start(unsigned char c)
{
    return c == '_' || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') || c >= 0x80;
}
static bool is_name_char(unsigned char c) { return is_name_start(c) || is_digit((char)c); }

/* (\d+_)*\d+ at p: returns the end, or p when there is no digit. */
static size_t scan_digits(const char *s, size_t len, size_t p)
{
    if (p >= len || !is_digit(s[p])) return p;
    size_t q = p;
    for (;;) {
        while (q < len && is_digit(s[q])) q++;
        if (q + 1 < len && s[q] == '_' && is_digit(s[q + 1])) {
            q++;
            continue;
        }
        return q;
    }
}

/* jinja2's float_re at p; returns the end or 0. */
static size_t match_float(const char *s, size_t len, size_t p)
{
    if (p > 0 && s[p - 1] == '.') return 0;
    size_t q = scan_digits(s, len, p);
    if (q == p) return 0;
    size_t frac_end = 0;
    if (q < len && s[q] == '.' && q + 1 < len && is_digit(s[q + 1])) frac_end = scan_digits(s, len, q + 1);
    size_t e = frac_end ? frac_end : q;
    if (e < len && (s[e] == 'e' || s[e] == 'E')) {
        size_t x = e + 1;
        if (x < len && (s[x] == '+' || s[x] == '-')) x++;
        size_t xe = scan_digits(s, len, x);
        if (xe > x) return xe;
    }
    return frac_end;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    c = (char)(c | 0x20);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* jinja2's integer_re at p; returns the end or 0, and the value. */
static size_t match_int(struct lexer *L, size_t p, int64_t *val, bool *overflow)
{
    const char *s = L->src;
    size_t len = L->len, q = p;
    int base = 10;
    *overflow = false;
    if (q + 1 < len && s[q] == '0' && strchr("bBoOxX", s[q + 1]) && s[q + 1]) {
        char k = (char)(s[q + 1] | 0x20);
        base = k == 'b' ? 2 : k == 'o' ? 8 : 16;
        size_t r = q + 2, last = 0;
        for (;;) {
            size_t d = r;
            if (d < len && s[d] == '_') d++;
            int v = d < len ? hexval(s[d]) : -1;
            if (v < 0 || v >= base) break;
            r = d + 1;
            last = r;
        }
        if (!last) goto decimal;
        q = last;
        uint64_t acc = 0;
        for (size_t i = p + 2; i < q; i++) {
            if (s[i] == '_') continue;
            uint64_t nv = acc * (uint64_t)base + (uint64_t)hexval(s[i]);
            if (acc > (UINT64_MAX - 15) / 16 || nv > (uint64_t)INT64_MAX) *overflow = true;
            acc = nv;
        }
        *val = (int64_t)acc;
        return q;
    }
decimal:
    if (q >= len || !is_digit(s[q])) return 0;
    if (s[q] == '0') {
        q++;
        for (;;) {
            size_t d = q;
            if (d < len && s[d] == '_') d++;
            if (d < len && s[d] == '0') q = d + 1;
            else break;
        }
        *val = 0;
        return q;
    }
    q = p + 1;
    for (;;) {
        size_t d = q;
        if (d < len && s[d] == '_') d++;
        if (d < len && is_digit(s[d])) q = d + 1;
        else break;
    }
    uint64_t acc = 0;
    for (size_t i = p; i < q; i++) {
        if (s[i] == '_') continue;
        if (acc > (uint64_t)INT64_MAX / 10) *overflow = true;
        acc = acc * 10 + (uint64_t)(s[i] - '0');
        if (acc > (uint64_t)INT64_MAX) *overflow = true;
    }
    *val = (int64_t)acc;
    return q;
}

/* Decodes a string literal's body like Python's .encode("ascii", "backslashreplace").decode("unicode-escape"). */
static int decode_string(struct lexer *L, size_t pos, const char *s, size_t n, struct jtoken *tok)
{
    char *out = malloc(n * 3 + 16); /* an escape never grows more than 3x (\é -> \xe9) */
    if (!out) return ST_ENOMEM;
    size_t o = 0, i = 0;
    while (i < n) {
        if (s[i] != '\\') {
            out[o++] = s[i++];
            continue;
        }
        unsigned char c = (unsigned char)s[i + 1]; /* the lexer guarantees a character after a backslash */
        size_t esc_at = i;
        i += 2;
        uint32_t cp;
        int digits = 0;
        switch (c) {
        case '\n': continue;
        case '\\': out[o++] = '\\'; continue;
        case '\'': out[o++] = '\''; continue;
        case '"': out[o++] = '"'; continue;
        case 'a': out[o++] = '\a'; continue;
        case 'b': out[o++] = '\b'; continue;
        case 'f': out[o++] = '\f'; continue;
        case 'n': out[o++] = '\n'; continue;
        case 'r': out[o++] = '\r'; continue;
        case 't': out[o++] = '\t'; continue;
        case 'v': out[o++] = '\v'; continue;
        case 'x': digits = 2; break;
        case 'u': digits = 4; break;
        case 'U': digits = 8; break;
        case 'N':
            free(out);
            return lex_fail(L, pos + esc_at, ST_EUNSUPPORTED, "unsupported escape \\N{...} in string literal");
        default:
            if (c >= '0' && c <= '7') {
                cp = c - '0';
                for (int k = 0; k < 2 && i < n && s[i] >= '0' && s[i] <= '7'; k++) cp = cp * 8 + (uint32_t)(s[i++] - '0');
                o += jinja_utf8_encode(cp, out + o);
                continue;
            }
            if (c >= 0x80) {
                /* backslashreplace turned the character into an escape whose backslash this one escapes */
                size_t adv;
                cp = jinja_utf8_decode(s + i - 1, n - (i - 1), &adv);
                i = i - 1 + adv;
                o += (size_t)sprintf(out + o, cp <= 0xff ? "\\x%02x" : cp <= 0xffff ? "\\u%04x" : "\\U%08x", cp);
                continue;
            }
            out[o++] = '\\';
            out[o++] = (char)c;
            continue;
        }
        cp = 0;
        for (int k = 0; k < digits; k++) {
            int h = i < n ? hexval(s[i]) : -1;
            if (h < 0) {
                free(out);
                return lex_fail(L, pos + esc_at, ST_EFORMAT, "truncated \\%c escape in string literal", c);
            }
            cp = cp * 16 + (uint32_t)h;
            i++;
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            free(out);
            return lex_fail(L, pos + esc_at, ST_EFORMAT, "illegal Unicode character in string literal");
        }
        o += jinja_utf8_encode(cp, out + o);
    }
    out[o] = 0;
    tok->str = out;
    tok->str_len = o;
    return 0;
}

static const struct {
    const char *s;
    enum jtok_type t;
} ops[] = {
    {"//", JT_FLOORDIV}, {"**", JT_POW}, {"==", JT_EQ}, {"!=", JT_NE}, {">=", JT_GTEQ}, {"<=", JT_LTEQ},
    {"+", JT_ADD}, {"-", JT_SUB}, {"/", JT_DIV}, {"*", JT_MUL}, {"%", JT_MOD}, {"~", JT_TILDE},
    {"[", JT_LBRACKET}, {"]", JT_RBRACKET}, {"(", JT_LPAREN}, {")", JT_RPAREN}, {"{", JT_LBRACE},
    {"}", JT_RBRACE}, {">", JT_GT}, {"<", JT_LT}, {"=", JT_ASSIGN}, {".", JT_DOT}, {":", JT_COLON},
    {"|", JT_PIPE}, {",", JT_COMMA}, {";", JT_SEMICOLON},
};

/* Lexes the inside of a {{ }} or {% %} tag up to and including its end. */
static int lex_tag(struct lexer *L, bool block)
{
    const char *s = L->src;
    size_t len = L->len;
    L->n_brackets = 0;
    while (L->pos < len) {
        size_t p = L->pos;
        if (L->n_brackets == 0) {
            const char *close = block ? "%}" : "}}";
            size_t end = 0;
            char sign = 0;
            if (block && s[p] == '+' && p + 2 < len && memcmp(s + p + 1, close, 2) == 0) {
                end = p + 3;
                sign = '+';
            } else if (s[p] == '-' && p + 2 < len && memcmp(s + p + 1, close, 2) == 0) {
                end = p + 3;
                sign = '-';
            } else if (p + 1 < len && memcmp(s + p, close, 2) == 0) {
                end = p + 2;
            }
            if (end) {
                if (sign == '-') end += space_run(s, len, end);
                else if (!sign && block && end < len && s[end] == '\n') end++;
                if (!emit(L, block ? JT_BLOCK_END : JT_VAR_END, p, end - p)) return ST_ENOMEM;
                L->line_starting = s[end - 1] == '\n';
                L->pos = end;
                return 0;
            }
        }
        size_t w = space_run(s, len, p);
        if (w) {
            L->pos += w;
            continue;
        }
        size_t e = match_float(s, len, p);
        if (e) {
            struct jtoken *t = emit(L, JT_FLOAT, p, e - p);
            if (!t) return ST_ENOMEM;
            char num[128];
            size_t k = 0;
            for (size_t i = p; i < e && k < sizeof(num) - 1; i++)
                if (s[i] != '_') num[k++] = s[i];
            num[k] = 0;
            t->f = strtod(num, NULL);
            L->pos = e;
            continue;
        }
        int64_t iv;
        bool overflow;
        e = match_int(L, p, &iv, &overflow);
        if (e) {
            if (overflow) return lex_fail(L, p, ST_ERANGE, "integer literal too large");
            struct jtoken *t = emit(L, JT_INT, p, e - p);
            if (!t) return ST_ENOMEM;
            t->i = iv;
            L->pos = e;
            continue;
        }
        if (is_name_start((unsigned char)s[p])) {
            e = p + 1;
            while (e < len && is_name_char((unsigned char)s[e])) {
                if ((unsigned char)s[e] >= 0x80) {
                    size_t adv;
                    uint32_t cp = jinja_utf8_decode(s + e, len - e, &adv);
                    if (jinja_py_isspace(cp)) break;
                    e += adv;
                } else {
                    e++;
                }
            }
            if (!emit(L, JT_NAME, p, e - p)) return ST_ENOMEM;
            L->pos = e;
            continue;
        }
        if (s[p] == '\'' || s[p] == '"') {
            char q = s[p];
            e = p + 1;
            while (e < len && s[e] != q) e += s[e] == '\\' ? 2 : 1;
            if (e >= len) return lex_fail(L, p, ST_EFORMAT, "unterminated string literal");
            struct jtoken *t = emit(L, JT_STRING, p, e + 1 - p);
            if (!t) return ST_ENOMEM;
            int rc = decode_string(L, p + 1, s + p + 1, e - p - 1, t);
            if (rc < 0) return rc;
            L->pos = e + 1;
            continue;
        }
        size_t k;
        for (k = 0; k < ST_ARRAY_LEN(ops); k++) {
            size_t ol = strlen(ops[k].s);
            if (p + ol <= len && memcmp(s + p, ops[k].s, ol) == 0) break;
        }
        if (k == ST_ARRAY_LEN(ops)) {
            size_t adv;
            uint32_t cp = jinja_utf8_decode(s + p, len - p, &adv);
            if (cp < 0x80 && cp >= 0x20) return lex_fail(L, p, ST_EFORMAT, "unexpected char '%c'", (char)cp);
            return lex_fail(L, p, ST_EFORMAT, "unexpected char U+%04X", cp);
        }
        char ch = ops[k].s[0];
        if (ch == '(' || ch == '[' || ch == '{') {
            if (L->n_brackets == (int)sizeof(L->brackets))
                return lex_fail(L, p, ST_ERANGE, "brackets nested deeper than %d", JINJA_MAX_PARSE_DEPTH);
            L->brackets[L->n_brackets++] = ch == '(' ? ')' : ch == '[' ? ']' : '}';
        } else if (ch == ')' || ch == ']' || ch == '}') {
            if (L->n_brackets == 0) return lex_fail(L, p, ST_EFORMAT, "unexpected '%c'", ch);
            char want = L->brackets[--L->n_brackets];
            if (want != ch) return lex_fail(L, p, ST_EFORMAT, "unexpected '%c', expected '%c'", ch, want);
        }
        if (!emit(L, ops[k].t, p, strlen(ops[k].s))) return ST_ENOMEM;
        L->pos = p + strlen(ops[k].s);
    }
    return 0; /* end of source inside a tag: the parser reports it */
}

/* {% raw %} at p (after the text)? Returns the end of the raw-begin tag, or 0. */
static size_t match_raw_begin(const char *s, size_t len, size_t p, char *sign)
{
    size_t q = p + 2;
    *sign = 0;
    if (q < len && (s[q] == '-' || s[q] == '+')) *sign = s[q++];
    q += space_run(s, len, q);
    if (len - q < 3 || memcmp(s + q, "raw", 3) != 0) return 0;
    q += 3;
    q += space_run(s, len, q);
    if (q + 2 < len && s[q] == '-' && s[q + 1] == '%' && s[q + 2] == '}') return q + 3 + space_run(s, len, q + 3);
    if (q + 1 < len && s[q] == '%' && s[q + 1] == '}') return q + 2;
    return 0;
}

/* The {% endraw %} at or after p: sets *at (tag start), *end, *sign; false when there is none. */
static bool find_raw_end(const char *s, size_t len, size_t p, size_t *at, size_t *end, char *sign)
{
    for (size_t i = p; i + 1 < len; i++) {
        if (s[i] != '{' || s[i + 1] != '%') continue;
        size_t q = i + 2;
        char sg = 0;
        if (q < len && (s[q] == '-' || s[q] == '+')) sg = s[q++];
        q += space_run(s, len, q);
        if (len - q < 6 || memcmp(s + q, "endraw", 6) != 0) continue;
        q += 6;
        q += space_run(s, len, q);
        size_t e = 0;
        if (q + 2 < len && s[q] == '+' && s[q + 1] == '%' && s[q + 2] == '}') e = q + 3;
        else if (q + 2 < len && s[q] == '-' && s[q + 1] == '%' && s[q + 2] == '}') e = q + 3 + space_run(s, len, q + 3);
        else if (q + 1 < len && s[q] == '%' && s[q + 1] == '}') e = q + 2 + (q + 2 < len && s[q + 2] == '\n');
        if (!e) continue;
        *at = i;
        *end = e;
        *sign = sg;
        return true;
    }
    return false;
}

int jinja_lex(const char *src, size_t len, struct jtoken_list *out, char *err)
{
    struct lexer L = {.src = src, .len = len, .out = out, .err = err, .loc_line = 1, .loc_col = 1};
    int rc;
    L.line_starting = true;
    memset(out, 0, sizeof(*out));
    while (L.pos < len) {
        /* the next tag opening */
        size_t t = L.pos;
        char kind = 0;
        for (; t + 1 < len; t++) {
            if (src[t] == '{' && (src[t + 1] == '{' || src[t + 1] == '%' || src[t + 1] == '#')) {
                kind = src[t + 1];
                break;
            }
        }
        if (!kind) {
            if ((rc = emit_data(&L, L.pos, len - L.pos)) < 0) goto fail;
            L.pos = len;
            break;
        }
        char sign = (t + 2 < len && (src[t + 2] == '-' || src[t + 2] == '+')) ? src[t + 2] : 0;
        char raw_sign = 0;
        size_t raw_end = kind == '%' ? match_raw_begin(src, len, t, &raw_sign) : 0;
        size_t keep = strip_text(&L, src + L.pos, t - L.pos, sign, kind != '{');
        if ((rc = emit_data(&L, L.pos, keep)) < 0) goto fail;
        if (raw_end) {
            L.line_starting = src[raw_end - 1] == '\n';
            size_t at, end;
            char esign;
            if (!find_raw_end(src, len, raw_end, &at, &end, &esign)) {
                if (raw_end == len) break; /* jinja2 quirk: nothing left to fail on */
                rc = lex_fail(&L, t, ST_EFORMAT, "missing end of raw directive");
                goto fail;
            }
            keep = strip_text(&L, src + raw_end, at - raw_end, esign, true);
            if ((rc = emit_data(&L, raw_end, keep)) < 0) goto fail;
            L.line_starting = src[end - 1] == '\n';
            L.pos = end;
            continue;
        }
        size_t body = t + 2 + (sign ? 1 : 0);
        L.line_starting = false;
        if (kind == '#') {
            size_t i, end = 0;
            for (i = body; i + 1 < len; i++) {
                if ((src[i] == '+' || src[i] == '-') && i + 2 < len && src[i + 1] == '#' && src[i + 2] == '}') {
                    end = i + 3;
                    if (src[i] == '-') end += space_run(src, len, end);
                    break;
                }
                if (src[i] == '#' && src[i + 1] == '}') {
                    end = i + 2 + (i + 2 < len && src[i + 2] == '\n');
                    break;
                }
            }
            if (!end) {
                if (body >= len) break; /* jinja2 quirk: an opener at the very end is accepted */
                rc = lex_fail(&L, t, ST_EFORMAT, "missing end of comment tag");
                goto fail;
            }
            L.line_starting = src[end - 1] == '\n';
            L.pos = end;
            continue;
        }
        if (!emit(&L, kind == '{' ? JT_VAR_BEGIN : JT_BLOCK_BEGIN, t, body - t)) {
            rc = ST_ENOMEM;
            goto fail;
        }
        L.pos = body;
        if ((rc = lex_tag(&L, kind == '%')) < 0) goto fail;
    }
    if (!emit(&L, JT_EOF, len, 0)) {
        rc = ST_ENOMEM;
        goto fail;
    }
    return 0;
fail:
    if (rc == ST_ENOMEM) err_set(err, rc, "chat template: out of memory");
    jinja_tokens_free(out);
    return rc;
}

void jinja_tokens_free(struct jtoken_list *t)
{
    for (size_t i = 0; i < t->n; i++) free(t->v[i].str);
    free(t->v);
    memset(t, 0, sizeof(*t));
}

const char *jinja_token_describe(const struct jtoken *t, char *buf, size_t n)
{
    switch (t->type) {
    case JT_EOF: return "end of template";
    case JT_DATA: return "template data / text";
    case JT_VAR_BEGIN: return "begin of print statement";
    case JT_VAR_END: return "end of print statement";
    case JT_BLOCK_BEGIN: return "begin of statement block";
    case JT_BLOCK_END: return "end of statement block";
    case JT_STRING: return "string";
    case JT_INT: return "integer";
    case JT_FLOAT: return "float";
    default: snprintf(buf, n, "%.*s", (int)ST_MIN(t->len, (size_t)64), t->s); return buf;
    }
}
