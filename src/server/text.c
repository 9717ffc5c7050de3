/* text: a growable string, and the output processor that turns streamed generated text into content and
 * reasoning, stopping at stop strings.
 *
 * Two stages, each holding back only what it cannot decide yet:
 *   1. stop strings: the longest tail of the pending text that is a proper prefix of some stop string waits for
 *      the next piece; a full match ends the output before the stop string.
 *   2. think split: "<think>" as the first thing of the output (after whitespace) opens reasoning, "</think>"
 *      closes it; a tail that could be the start of the awaited tag waits.
 * Stop strings and tags are valid UTF-8, so every cut lands on a character boundary when the input pieces do. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"

static const char THINK_OPEN[] = "<think>", THINK_CLOSE[] = "</think>";

int text_buf_append(struct text_buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1) {
            if (cap > ((size_t)-1) / 2) return ST_ENOMEM;
            cap *= 2;
        }
        char *p = realloc(b->s, cap);
        if (!p) return ST_ENOMEM;
        b->s = p;
        b->cap = cap;
    }
    if (n) memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
    return ST_OK;
}

int text_buf_printf(struct text_buf *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0) return ST_EINVAL;
    if ((size_t)n < sizeof(small)) return text_buf_append(b, small, (size_t)n);
    char *big = malloc((size_t)n + 1);
    if (!big) return ST_ENOMEM;
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int rc = text_buf_append(b, big, (size_t)n);
    free(big);
    return rc;
}

void text_buf_free(struct text_buf *b)
{
    free(b->s);
    memset(b, 0, sizeof(*b));
}

/* Drops the first n bytes. */
static void buf_consume(struct text_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->s, b->s + n, b->len - n);
        b->len -= n;
    }
    if (b->s) b->s[b->len] = 0;
}

static const char *find_bytes(const char *hay, size_t n, const char *needle, size_t m)
{
    if (m == 0 || m > n) return NULL;
    return memmem(hay, n, needle, m);
}

/* Length of the longest tail of s[0..n) that is a proper prefix of pat. */
static size_t prefix_tail(const char *s, size_t n, const char *pat, size_t m)
{
    size_t k = ST_MIN(n, m > 0 ? m - 1 : 0);
    for (; k > 0; k--)
        if (memcmp(s + n - k, pat, k) == 0) return k;
    return 0;
}

static int emit(struct textproc *tp, enum textproc_mode mode, const char *s, size_t n)
{
    if (!n) return ST_OK;
    return text_buf_append(mode == TEXTPROC_REASONING ? &tp->reasoning : &tp->content, s, n);
}

static bool all_space(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\n' && s[i] != '\r' && s[i] != '\t') return false;
    return true;
}

/* Stage 2: routes decided text to content or reasoning. final: no more text follows. */
static int think_feed(struct textproc *tp, const char *s, size_t n, bool final)
{
    int rc;
    if (!tp->think) return emit(tp, TEXTPROC_CONTENT, s, n);
    if ((rc = text_buf_append(&tp->tag, s, n)) < 0) return rc;
    for (;;) {
        struct text_buf *w = &tp->tag;
        if (w->len == 0) return ST_OK;
        if (tp->mode == TEXTPROC_REASONING) {
            const size_t m = sizeof(THINK_CLOSE) - 1;
            const char *hit = find_bytes(w->s, w->len, THINK_CLOSE, m);
            if (hit) {
                size_t at = (size_t)(hit - w->s);
                if ((rc = emit(tp, TEXTPROC_REASONING, w->s, at)) < 0) return rc;
                buf_consume(w, at + m);
                tp->mode = TEXTPROC_CONTENT;
                tp->may_open = false;
                continue;
            }
            size_t hold = final ? 0 : prefix_tail(w->s, w->len, THINK_CLOSE, m);
            if ((rc = emit(tp, TEXTPROC_REASONING, w->s, w->len - hold)) < 0) return rc;
            buf_consume(w, w->len - hold);
            return ST_OK;
        }
        if (tp->may_open) {
            const size_t m = sizeof(THINK_OPEN) - 1;
            size_t k = 0;
            while (k < w->len && all_space(w->s + k, 1)) k++;
            size_t rest = w->len - k;
            if (rest >= m && memcmp(w->s + k, THINK_OPEN, m) == 0) {
                buf_consume(w, k + m); /* whitespace before the tag is dropped with it */
                tp->mode = TEXTPROC_REASONING;
                tp->reasoned = true;
                tp->may_open = false;
                continue;
            }
            if (!final && rest < m && memcmp(w->s + k, THINK_OPEN, rest) == 0) return ST_OK; /* undecided */
            tp->may_open = false;
        }
        if ((rc = emit(tp, TEXTPROC_CONTENT, w->s, w->len)) < 0) return rc;
        buf_consume(w, w->len);
        return ST_OK;
    }
}

int textproc_init(struct textproc *tp, const char *const *stops, int n_stops, bool think, bool in_reasoning)
{
    memset(tp, 0, sizeof(*tp));
    tp->stop_index = -1;
    tp->think = think;
    tp->mode = think && in_reasoning ? TEXTPROC_REASONING : TEXTPROC_CONTENT;
    tp->may_open = think && !in_reasoning;
    tp->reasoned = think && in_reasoning;
    if (n_stops > 0) {
        tp->stops = calloc((size_t)n_stops, sizeof(char *));
        if (!tp->stops) return ST_ENOMEM;
        for (int i = 0; i < n_stops; i++) {
            if (!stops[i] || !stops[i][0]) continue; /* an empty stop string never matches */
            tp->stops[tp->n_stops] = st_strdup(stops[i]);
            if (!tp->stops[tp->n_stops]) {
                textproc_free(tp);
                return ST_ENOMEM;
            }
            tp->n_stops++;
        }
    }
    /* the outputs always hold a string, so readers never see NULL */
    if (text_buf_append(&tp->content, "", 0) < 0 || text_buf_append(&tp->reasoning, "", 0) < 0) {
        textproc_free(tp);
        return ST_ENOMEM;
    }
    return ST_OK;
}

int textproc_push(struct textproc *tp, const char *text, size_t len)
{
    int rc;
    if (tp->stopped) return 1;
    if (tp->n_stops == 0) return think_feed(tp, text, len, false);
    if ((rc = text_buf_append(&tp->pend, text, len)) < 0) return rc;
    struct text_buf *p = &tp->pend;
    /* the earliest match wins (a stop string cannot start in text already released: that text's tail was
     * never a prefix of one, or it would have been held back) */
    size_t best = (size_t)-1;
    int which = -1;
    for (int i = 0; i < tp->n_stops; i++) {
        const char *hit = find_bytes(p->s, p->len, tp->stops[i], strlen(tp->stops[i]));
        if (hit && (size_t)(hit - p->s) < best) {
            best = (size_t)(hit - p->s);
            which = i;
        }
    }
    if (which >= 0) {
        tp->stopped = true;
        tp->stop_index = which;
        rc = think_feed(tp, p->s, best, false);
        buf_consume(p, p->len);
        return rc < 0 ? rc : 1;
    }
    size_t hold = 0;
    for (int i = 0; i < tp->n_stops; i++) {
        size_t h = prefix_tail(p->s, p->len, tp->stops[i], strlen(tp->stops[i]));
        if (h > hold) hold = h;
    }
    size_t out = p->len - hold;
    if ((rc = think_feed(tp, p->s, out, false)) < 0) return rc;
    buf_consume(p, out);
    return 0;
}

int textproc_finish(struct textproc *tp)
{
    int rc = ST_OK;
    if (!tp->stopped && tp->pend.len) {
        rc = think_feed(tp, tp->pend.s, tp->pend.len, true);
        buf_consume(&tp->pend, tp->pend.len);
        if (rc < 0) return rc;
    }
    return think_feed(tp, "", 0, true);
}

void textproc_free(struct textproc *tp)
{
    for (int i = 0; i < tp->n_stops; i++) free(tp->stops[i]);
    free(tp->stops);
    text_buf_free(&tp->pend);
    text_buf_free(&tp->tag);
    text_buf_free(&tp->content);
    text_buf_free(&tp->reasoning);
    memset(tp, 0, sizeof(*tp));
}
